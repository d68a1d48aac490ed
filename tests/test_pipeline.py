"""dni.pipeline: stages in separate processes (gloo, spawned here) against one-process DNI."""

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dni import DNI
from dni.pipeline import (
    PipelineStage,
    balanced_stages,
    block_costs,
    check_counts,
    measured_block_costs,
)

STEPS = 6
BATCH = 16


def mlp(seed: int, width: int = 24) -> nn.Sequential:
    """A small FCN of four blocks (three interfaces), the shape of the project's MLP.
    BatchNorm sits in the first block only: below BatchNorm a gradient sums to zero over the
    batch, and a synthesizer bias fitted to it is rounding noise that Adam magnifies, which
    would make exact comparisons fail on noise alone."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(nn.Linear(12, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()),
        nn.Sequential(nn.Linear(width, width), nn.ReLU()),
        nn.Sequential(nn.Linear(width, width), nn.ReLU()),
        nn.Linear(width, 5))


def data(steps: int = STEPS):
    """Batches of random inputs and labels (the last one smaller, to test padding)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(steps * BATCH - 5, 12, generator=g)
    y = torch.randint(0, 5, (len(x),), generator=g)
    return list(zip(x.split(BATCH), y.split(BATCH)))


def one_process(conditioned: bool, grad_scale: float, synthesizer: str = "linear",
                steps: int = STEPS):
    """Parameters of every block and synthesizer after STEPS steps of one-process DNI."""
    net = mlp(seed=3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    model = DNI(net, optim=opt, synthesizer=synthesizer, context_size=5 if conditioned else 0,
                grad_scale=grad_scale, synthesizer_lr=3e-3, example_input=data()[0][0][:2])
    for x, y in data(steps):
        opt.zero_grad()
        out = model(x, context=y) if conditioned else model(x)
        F.cross_entropy(out, y).backward()
        opt.step()
    blocks = [p.detach().clone() for p in net.parameters()]
    synth = [p.detach().clone() for p in model.synthesizer_parameters()]
    return blocks, synth


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, options):
    """One stage: train STEPS steps, then save its parameters (or the error) to `out`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = mlp(seed=3)
        batches = data(options.get("steps", STEPS))
        stage = PipelineStage(net, batches[0][0][:2], max_batch=BATCH,
                              synthesizer=options.get("synthesizer", "linear"),
                              counts=options.get("counts"),
                              context_size=5 if options["conditioned"] else 0,
                              grad_scale=options["grad_scale"], staleness=options["staleness"])
        opt = torch.optim.Adam(stage.param_groups(lr=1e-2, synthesizer_lr=3e-3))
        losses = []
        for x, y in batches:
            losses.append(stage.train_step(opt, x, y))
        stage.collect_targets()
        while stage.pending:  # the updates still owed at the end
            opt.zero_grad(set_to_none=True)
            stage.fit_synthesizer()
            opt.step()
        stage.eval()
        outputs = [stage.eval_step(x, y) for x, y in batches]
        torch.save({"blocks": [p.detach() for p in stage.block_parameters()],
                    "synth": [p.detach() for p in stage.synthesizer_parameters()],
                    "block_state": stage.blocks.state_dict(), "counts": stage.counts, "losses": losses, "outputs": outputs,
                    "times": vars(stage.times)}, f"{out}/stage{rank}.pt")
        stage.flush()
    except Exception:  # noqa: BLE001 (reported to the test through the file)
        with open(f"{out}/stage{rank}.err", "w") as f:
            f.write(traceback.format_exc())
    finally:
        dist.destroy_process_group()


def run_stages(tmp_path, world=2, **options):
    options.setdefault("conditioned", False)
    options.setdefault("grad_scale", 1.0)
    mp.start_processes(_worker, args=(world, free_port(), str(tmp_path), options),
                       nprocs=world, start_method="spawn")
    errors = list(tmp_path.glob("*.err"))
    assert not errors, errors[0].read_text()
    return [torch.load(tmp_path / f"stage{r}.pt") for r in range(world)]


@pytest.mark.parametrize("conditioned,grad_scale,counts", [
    (False, 1.0, [1, 3]), (True, 0.5, [2, 2])])
def test_staleness_0_follows_one_process_dni_exactly(tmp_path, conditioned, grad_scale, counts):
    """With staleness 0 each stage waits for its target before the next batch, so after k
    steps every block and synthesizer equals one-process DNI's (same seed, same Adam)."""
    stages = run_stages(tmp_path, conditioned=conditioned, grad_scale=grad_scale, counts=counts,
                        staleness=0)
    blocks, synth = one_process(conditioned, grad_scale)
    got_blocks = [p for s in stages for p in s["blocks"]]
    got_synth = [p for s in stages for p in s["synth"]]
    assert len(got_blocks) == len(blocks) and len(got_synth) == len(synth)
    for got, want in zip(got_blocks + got_synth, blocks + synth):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the synthesizers did learn (they start at zero), so the comparison has teeth
    assert all(p.abs().sum() > 0 for p in got_synth)


def test_stale_updates_differ_but_train(tmp_path):
    """Staleness 1 changes the order of synthesizer updates (parameters differ from one
    process) yet every stage trains, and the last stage reports a finite loss each step."""
    stages = run_stages(tmp_path, staleness=1, counts=[1, 3])
    blocks, _ = one_process(False, 1.0)
    got = [p for s in stages for p in s["blocks"]]
    assert any(not torch.allclose(g, w) for g, w in zip(got, blocks))
    losses = stages[1]["losses"]
    assert stages[0]["losses"] == [None] * STEPS
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(v)) for v in losses)


def test_evaluation_runs_through_the_pipeline(tmp_path):
    """eval_step at the last stage returns the whole network's output in eval mode, the
    smaller last batch included."""
    stages = run_stages(tmp_path, staleness=1, counts=[2, 2])
    net = mlp(seed=3)
    for stage, first in zip(stages, (0, 2)):
        for i in range(2):
            prefix = f"{i}."
            net[first + i].load_state_dict({k[len(prefix):]: v for k, v in
                                            stage["block_state"].items() if k.startswith(prefix)})
    net.eval()
    assert stages[0]["outputs"] == [None] * STEPS
    for (x, y), (out, labels) in zip(data(), stages[1]["outputs"]):
        assert torch.equal(labels, y) and labels.dtype == torch.long
        with torch.no_grad():
            torch.testing.assert_close(out, net(x))
    assert len(stages[1]["outputs"][-1][0]) == BATCH - 5


def test_three_stages_follow_one_process_dni(tmp_path):
    """A middle stage both receives targets and sends them on."""
    stages = run_stages(tmp_path, world=3, staleness=0, counts=[1, 1, 2])
    blocks, synth = one_process(False, 1.0)
    got = [p for s in stages for p in s["blocks"] + s["synth"]]
    want = blocks[:3] + synth[:2] + blocks[3:5] + synth[2:4] + blocks[5:] + synth[4:]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_balanced_stages_minimise_the_largest_stage():
    assert balanced_stages([3, 1, 1, 1], 2) == [1, 3]
    assert balanced_stages([1, 1, 1, 5], 2) == [3, 1]
    assert balanced_stages([2, 2, 2, 2], 4) == [1, 1, 1, 1]
    with pytest.raises(ValueError):
        balanced_stages([1, 2], 3)


def test_block_costs_count_matmul_operations_forward_and_backward():
    """2 B n m per matrix product: forward, weight gradient, and the input gradient except
    at the first block; a synthesizer (w x w) forward and weight gradient after each block
    but the last."""
    from dni.wrapper import synthesizer_factory

    net, w, b = mlp(seed=0, width=8), 8, 4
    costs = block_costs(list(net.children()), torch.randn(b, 12), synthesizer_factory("linear"))
    synth = 2 * (2 * b * w * w)
    assert costs == [2 * (2 * b * 12 * w) + synth, 3 * (2 * b * w * w) + synth,
                     3 * (2 * b * w * w) + synth, 3 * (2 * b * w * 5)]
    assert not any(p.grad is not None for p in net.parameters())


def test_measured_block_costs_time_copies_and_leave_the_network_and_random_stream_alone():
    """One time per block, the heavy block the costliest; the blocks' weights, BN statistics
    and gradients, and the global random stream, are as before."""
    from dni.wrapper import synthesizer_factory

    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU()),
                        nn.Sequential(nn.Linear(16, 4096), nn.ReLU(), nn.Linear(4096, 16)),
                        nn.Linear(16, 5))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 12)
    state = torch.get_rng_state()
    costs = measured_block_costs(list(net.children()), x,
                                 synthesizer_factory("linear"), batch=256, repeats=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(costs) == 3 and all(c > 0 for c in costs)
    assert costs[1] > costs[0] and costs[1] > costs[2]
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not any(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("counts", [[1, 2], [0, 4], [2, 3], [4]])
def test_bad_stage_sizes_are_refused(counts):
    with pytest.raises(ValueError):
        check_counts(counts, 4, 2)
