"""bench/probes/dni_limits.py's variants against autograd: the warm-start step is backprop with
every synthesizer fit on the true gradient, and a slow-copy interface sends the copy's gradient while
fitting the synthesizer itself."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from bench.probes.dni_limits import backprop_step, follow_synthesizers, use_slow_copies
from dni import DNI, synthesizer_loss

B, D_IN, WIDTH, CLASSES = 16, 12, 8, 5


def net_and_batch():
    """Two tanh blocks and a head in float64, and one batch."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(nn.Linear(D_IN, WIDTH), nn.Tanh()),
                        nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()),
                        nn.Linear(WIDTH, CLASSES)).double()
    x = torch.randn(B, D_IN, dtype=torch.float64)
    return net, x, torch.randint(0, CLASSES, (B,))


def random_dni(net, x):
    """DNI with non-zero synthesizers, so every gradient below is non-trivial."""
    model = DNI(net, example_input=x)
    with torch.no_grad():
        for p in model.synthesizer_parameters():
            p.normal_(0, 0.3)
    return model


def test_warm_start_step_is_backprop_and_fits_synthesizers_on_true_gradients():
    net, x, y = net_and_batch()
    reference = copy.deepcopy(net)
    model = random_dni(net, x)
    synthesizers = copy.deepcopy(model.interfaces)
    backprop_step(model, x, y)

    hs, h = [], x
    for block in list(reference)[:-1]:
        h = block(h)
        hs.append(h)
    loss = F.cross_entropy(list(reference)[-1](h), y)
    true = torch.autograd.grad(loss, hs, retain_graph=True)
    loss.backward()
    for got, want in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad)
    for i, interface in enumerate(model.interfaces):
        fit = synthesizer_loss(synthesizers[i].predict(hs[i]), B * true[i])
        want = torch.autograd.grad(fit, list(synthesizers[i].parameters()))
        assert all(w.abs().max() > 0 for w in want)
        for got, expected in zip(interface.parameters(), want):
            torch.testing.assert_close(got.grad, expected)


def test_slow_copy_sends_the_copy_and_fits_the_synthesizer():
    net, x, y = net_and_batch()
    model = random_dni(net, x)
    use_slow_copies(model)
    top = model.interfaces[-1]
    with torch.no_grad():               # make the copy differ from the synthesizer
        for p in top.slow.parameters():
            p.normal_(0, 0.3)
    block = copy.deepcopy(net[1])
    h_below = net[0](x).detach()
    sent = top.slow(block(h_below))[0].detach() / B           # the top interface: uncentred
    want_block = torch.autograd.grad(block(h_below), list(block.parameters()), sent)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    for got, want in zip(net[1].parameters(), want_block):
        torch.testing.assert_close(got.grad, want)
    fitted = top.last_synthetic
    torch.testing.assert_close(fitted, top.predict(block(h_below)).detach() / B)
    assert (fitted - sent).abs().max() > 1e-3        # the fit is the synthesizer's, not the copy's


def test_follow_moves_the_copy_towards_the_synthesizer():
    net, x, _ = net_and_batch()
    model = random_dni(net, x)
    use_slow_copies(model)
    interface = model.interfaces[0]
    with torch.no_grad():
        for p in interface.slow.parameters():
            p.zero_()
    follow_synthesizers(model, 0.75)
    for slow, fast in zip(interface.slow.parameters(), interface.synthesizer.parameters()):
        torch.testing.assert_close(slow, 0.25 * fast)
    assert not any(p.requires_grad for p in interface.slow.parameters())
