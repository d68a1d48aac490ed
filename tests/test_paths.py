"""DNI on networks that are not a plain chain: an interface's output read by more than one
path above it (a skip into the head, two blocks with interfaces), and a block whose first
operation writes its input in place. Each against a step written out by hand with autograd."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dni import DNI, synthesizer_loss
from dni.reference import reference_step

B, D_IN, WIDTH, CLASSES = 16, 12, 8, 5


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, D_IN, generator=g, dtype=torch.float64),
            torch.randint(0, CLASSES, (B,), generator=g))


def randomise_synthesizers(model, seed=2):
    """Non-zero synthesizer weights, so every target and gradient is non-trivial."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.synthesizer_parameters():
            p.normal_(0, 0.3)


def synthetic(synthesizer, h, center):
    """S(h.detach()), centred over the batch when `center`."""
    out = synthesizer(h.detach(), None)[0]
    return out - out.mean(0, keepdim=True) if center else out


def assert_same_gradients(net, reference, synthesizers, model):
    for (name, got), want in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, msg=name)
    for interface, copied in zip(model.interfaces, synthesizers):
        for got, want in zip(interface.synthesizer.parameters(), copied.parameters()):
            torch.testing.assert_close(got.grad, want.grad)


class SkipNet(nn.Module):
    """head(relu(b(h1)) + h1) with h1 = a(x): block a also feeds the loss past block b."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(D_IN, WIDTH), nn.Tanh())
        self.b = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        h1 = self.a(x)
        return self.head(torch.relu(self.b(h1)) + h1)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_a_skip_past_the_block_above_adds_its_true_gradient_to_the_target(scale):
    """Interface a's target is the synthetic gradient b sent back through b (its scale undone)
    plus the true gradient along the skip, fit once; block a receives only its own synthetic
    gradient, centred (a is below the top interface); b's target is the true gradient."""
    torch.manual_seed(0)
    net = SkipNet().double()
    reference = copy.deepcopy(net)
    x, y = batch()
    model = DNI(net, grad_scale=scale, example_input=x)
    assert model.block_names == ["a", "b"]
    randomise_synthesizers(model)
    synth_a, synth_b = [copy.deepcopy(i.synthesizer) for i in model.interfaces]

    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()

    h1 = reference.a(x)
    g1 = synthetic(synth_a, h1, center=True)
    h1.backward(scale * g1.detach() / B)
    x2 = h1.detach().requires_grad_()
    h2 = reference.b(x2)
    g2 = synthetic(synth_b, h2, center=False)
    h2.backward(scale * g2.detach() / B)
    through_b = x2.grad.clone()                          # under b's scale
    x2.grad = None
    x3 = h2.detach().requires_grad_()
    F.cross_entropy(reference.head(torch.relu(x3) + x2), y).backward()
    along_skip = x2.grad
    assert through_b.abs().max() > 1e-3 and along_skip.abs().max() > 1e-3
    target_a = through_b / scale + along_skip
    (synthesizer_loss(g1, B * target_a) + synthesizer_loss(g2, B * x3.grad)).backward()

    assert_same_gradients(net, reference, [synth_a, synth_b], model)
    torch.testing.assert_close(model.interfaces[0].last_target, target_a)
    torch.testing.assert_close(model.interfaces[1].last_target, x3.grad)
    torch.testing.assert_close(model.interfaces[0].last_loss,
                               synthesizer_loss(g1, B * target_a).detach())
    torch.testing.assert_close(model.interfaces[0].last_synthetic, g1.detach() / B)


class TwoReadersNet(nn.Module):
    """head(cat(b(h1), c(h1))) with h1 = a(x): two blocks with interfaces read a's output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(D_IN, WIDTH), nn.Tanh())
        self.b = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())
        self.c = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())
        self.head = nn.Linear(2 * WIDTH, CLASSES)

    def forward(self, x):
        h1 = self.a(x)
        return self.head(torch.cat([self.b(h1), self.c(h1)], dim=1))


def test_two_blocks_above_one_interface_both_send_their_part_of_its_target():
    scale = 0.5
    torch.manual_seed(0)
    net = TwoReadersNet().double()
    reference = copy.deepcopy(net)
    x, y = batch()
    model = DNI(net, grad_scale=scale, blocks=["a", "b", "c"], example_input=x)
    randomise_synthesizers(model)
    synthesizers = [copy.deepcopy(i.synthesizer) for i in model.interfaces]
    centred = [i.center for i in model.interfaces]
    assert centred == [True, True, False]                # c is called last: the top one

    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()

    h1 = reference.a(x)
    g1 = synthetic(synthesizers[0], h1, centred[0])
    h1.backward(scale * g1.detach() / B)
    x2 = h1.detach().requires_grad_()
    sent, outputs = [], []
    for block, synthesizer, center in zip([reference.b, reference.c], synthesizers[1:],
                                          centred[1:]):
        h = block(x2)
        g = synthetic(synthesizer, h, center)
        h.backward(scale * g.detach() / B)
        sent.append(g)
        outputs.append(h.detach().requires_grad_())
    F.cross_entropy(reference.head(torch.cat(outputs, dim=1)), y).backward()
    target_a = x2.grad / scale                           # both parts came under scale
    fit = synthesizer_loss(g1, B * target_a)
    for g, out in zip(sent, outputs):
        fit = fit + synthesizer_loss(g, B * out.grad)
    fit.backward()

    assert_same_gradients(net, reference, synthesizers, model)
    torch.testing.assert_close(model.interfaces[0].last_target, target_a)


@pytest.mark.parametrize("center", [True, False])
def test_a_block_that_writes_its_input_in_place_trains_as_the_reference(center):
    """ReLU(inplace=True) as the first operation after an interface: the same step, over
    three optimizer steps, as the network written without in-place operations."""
    def network(inplace):
        torch.manual_seed(0)
        return nn.Sequential(nn.Sequential(nn.Linear(D_IN, WIDTH), nn.Tanh()),
                             nn.Sequential(nn.ReLU(inplace=inplace), nn.Linear(WIDTH, WIDTH)),
                             nn.Sequential(nn.ReLU(inplace=inplace),
                                           nn.Linear(WIDTH, CLASSES))).double()

    net, reference = network(inplace=True), network(inplace=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    model = DNI(net, optim=opt, grad_scale=0.5, synthesizer_lr=0.05, center_gradients=center,
                example_input=batch()[0])
    randomise_synthesizers(model)
    synthesizers = [copy.deepcopy(i.synthesizer) for i in model.interfaces]
    ref_opt = torch.optim.SGD([{"params": reference.parameters()},
                               {"params": [p for s in synthesizers for p in s.parameters()],
                                "lr": 0.05}], lr=0.1)
    for step in range(3):
        x, y = batch(seed=10 + step)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        ref_opt.zero_grad()
        ref_loss = reference_step(list(reference)[:-1], synthesizers, reference[-1], x, y,
                                  F.cross_entropy, scale=0.5, center=center)
        torch.testing.assert_close(loss.detach(), ref_loss)
        assert_same_gradients(net, reference, synthesizers, model)
        opt.step()
        ref_opt.step()


def test_the_true_gradient_of_the_diagnostics_is_taken_before_an_in_place_first_operation():
    """synthetic_and_true_gradients' true gradient at an interface is dL/dh at the block's
    output, as on the network written without in-place operations (not after the next
    block's ReLU(inplace=True) has overwritten it)."""
    def network(inplace):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(D_IN, WIDTH),
                             nn.Sequential(nn.ReLU(inplace=inplace), nn.Linear(WIDTH, CLASSES))
                             ).double()

    x, y = batch()
    reference = network(inplace=False)
    h = reference[0](x)
    want, = torch.autograd.grad(F.cross_entropy(reference[1](h), y), h)
    model = DNI(network(inplace=True), example_input=x)
    (_, true), = model.synthetic_and_true_gradients(F.cross_entropy, x, y)
    assert (h <= 0).any()                                # the ReLU's mask matters
    torch.testing.assert_close(true, want)
