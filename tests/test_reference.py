"""The hand-written reference step (dni/reference.py, the paper's algorithm line by line)
equals the production mechanism (`DNI` over `Interface`) step for step: every block's,
synthesizer's and the head's parameters, over several optimizer steps, with BatchNorm in every
block, for DNI and cDNI, a grad_scale, a loss summed over the batch (batch_mean=False), and
the synthetic gradients below the top interface centred over the batch (the default) or not
(the paper's)."""

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dni import DNI
from dni.reference import reference_step
from dni.synthesizers import one_hot


def stack():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU()),
              nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU()),
              nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU())]
    return nn.Sequential(*blocks, nn.Linear(8, 5))


@pytest.mark.parametrize("conditioned, scale, batch_mean, center", [
    (False, 1.0, True, False), (True, 1.0, True, False), (False, 0.5, True, False),
    (False, 1.0, False, False),               # a loss summed over the batch
    (False, 1.0, True, True), (True, 0.5, True, True)])   # the library's default, centred
def test_reference_step_equals_dni(conditioned, scale, batch_mean, center):
    x = torch.randn(3, 10, 12)
    y = torch.randint(0, 5, (3, 10))
    net = stack()
    reference = copy.deepcopy(net)            # before the hooks go in
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    model = DNI(net, optim=opt, example_input=x[0], grad_scale=scale,
                context_size=5 if conditioned else 0, synthesizer_lr=0.05,
                batch_mean=batch_mean, center_gradients=center)
    with torch.no_grad():                     # zero-initialised, S would say nothing at first
        for p in model.interfaces.parameters():
            p.normal_(std=0.2)
    synthesizers = [copy.deepcopy(i.synthesizer) for i in model.interfaces]
    ref_opt = torch.optim.SGD([{"params": reference.parameters()},
                               {"params": [p for s in synthesizers for p in s.parameters()],
                                "lr": 0.05}], lr=0.1)
    loss_fn = F.cross_entropy if batch_mean else partial(F.cross_entropy, reduction="sum")
    for step in range(3):
        opt.zero_grad()
        out = model(x[step], context=y[step]) if conditioned else model(x[step])
        loss = loss_fn(out, y[step])
        loss.backward()
        opt.step()
        ref_opt.zero_grad()
        ref_loss = reference_step(list(reference)[:-1], synthesizers, reference[-1], x[step],
                                  y[step], loss_fn, scale=scale, batch_mean=batch_mean,
                                  center=center,
                                  context=one_hot(y[step], 5) if conditioned else None)
        ref_opt.step()
        assert torch.allclose(loss, ref_loss, atol=1e-6), step
        for (name, a), b in zip(net.named_parameters(), reference.parameters()):
            assert torch.allclose(a, b, atol=1e-6), (step, name)
        for i, (interface, s) in enumerate(zip(model.interfaces, synthesizers)):
            for a, b in zip(interface.synthesizer.parameters(), s.parameters()):
                assert torch.allclose(a, b, atol=1e-6), (step, i)
        for (name, a), b in zip(net.named_buffers(), reference.buffers()):
            assert torch.allclose(a.float(), b.float(), atol=1e-6), (step, name)
