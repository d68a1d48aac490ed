"""bench/timing.py: measured step times of blocks and synthesizers, on copies."""

import torch
from torch import nn

from bench.timing import measured_costs
from dni.wrapper import synthesizer_factory


def test_measured_costs_time_copies_and_leave_the_network_and_random_stream_alone():
    """One time per block and per synthesizer (after every block but the last), the heavy
    block the costliest; the blocks' weights, BN statistics and gradients, and the global
    random stream, are as before."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU()),
                        nn.Sequential(nn.Linear(16, 4096), nn.ReLU(), nn.Linear(4096, 16)),
                        nn.Linear(16, 5))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 12)
    state = torch.get_rng_state()
    blocks, synth = measured_costs(list(net.children()), x,
                                   synthesizer_factory("linear"), batch=256, repeats=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(blocks) == 3 and len(synth) == 2 and all(c > 0 for c in blocks + synth)
    assert blocks[1] > blocks[0] and blocks[1] > blocks[2]
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not any(p.grad is not None for p in net.parameters())
