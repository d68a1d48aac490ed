"""The synthetic-gradient mechanics against autograd: which gradient reaches which parameters,
and what each synthesizer is trained on."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dni import DNI, Interface, LinearSynthesizer, Synthesizer, synthesizer_loss

B, D_IN, WIDTH, CLASSES = 16, 12, 8, 5


def make_net(seed=0):
    """Three hidden blocks and a head, in float64 so comparisons can be tight."""
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Linear(D_IN if i == 0 else WIDTH, WIDTH), nn.BatchNorm1d(WIDTH),
                            nn.Tanh()) for i in range(3)]
    return nn.Sequential(*blocks, nn.Linear(WIDTH, CLASSES)).double()


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


def block_grads(net, upto):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for block in list(net)[:upto] for p in block.parameters()]


def dni_step(model, x, y, scale=1.0):
    """One training step's backward (no optimizer step), with the loop's usual order."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    (scale * F.cross_entropy(out, y)).backward()
    return out


def activations(net, x):
    """Each hidden block's output in a full-graph forward."""
    hs, h = [], x
    for block in list(net)[:-1]:
        h = block(h)
        hs.append(h)
    return hs, list(net)[-1](h)


def test_oracle_synthesizer_reproduces_backprop_gradients():
    net = make_net()
    reference = copy.deepcopy(net)
    x, y = batch()
    hs, out = activations(reference, x)
    params = list(reference.parameters())
    grads = torch.autograd.grad(F.cross_entropy(out, y), hs + params)
    true, bp_grads = grads[:len(hs)], grads[len(hs):]
    calls = iter(range(3))

    class Oracle(Synthesizer):
        """Returns the true per-example gradient of the current interface."""

        def forward(self, input, hidden=None, context=None):
            return true[next(calls)] * len(input), None

    model = DNI(net, synthesizer=lambda shape, k: Oracle(shape[0]), example_input=x,
                center_gradients=False)
    dni_step(model, x, y)
    for got, want in zip([p.grad for p in net.parameters()], bp_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_centred_interface_sends_and_fits_the_batch_centred_gradient(scale):
    """center=True: the block receives scale * (S - mean_batch S) / B, and the synthesizer is
    fit on ||(S - mean S) - B d||^2 with d the gradient that arrives from above (different for
    every example, so a target ignored or mis-scaled would show)."""
    torch.manual_seed(0)
    block = nn.Linear(D_IN, WIDTH).double()
    synthesizer = LinearSynthesizer(WIDTH).double()
    with torch.no_grad():
        for p in synthesizer.parameters():
            p.normal_(0, 0.3)
    copies = copy.deepcopy(block), copy.deepcopy(synthesizer)
    interface = Interface(synthesizer, grad_scale=scale, center=True)
    x, _ = batch()
    above = torch.randn(WIDTH, 3, dtype=torch.float64)

    def loss_above(h):
        return (torch.tanh(h) @ above).pow(2).sum() / B

    loss_above(interface(block(x))).backward()

    ref_block, ref_synthesizer = copies
    h = ref_block(x)
    s = ref_synthesizer(h.detach())[0]
    centred = s - s.mean(0, keepdim=True)
    assert centred.abs().sum(0).max() > 0 and centred.sum(0).abs().max() < 1e-12
    want_block = torch.autograd.grad(h, list(ref_block.parameters()), scale * centred.detach() / B)
    h_above = h.detach().requires_grad_()
    d, = torch.autograd.grad(loss_above(h_above), h_above)
    assert (d - d.mean(0)).abs().max() > 1e-3            # the target differs between examples
    want_synth = torch.autograd.grad(synthesizer_loss(centred, B * d),
                                     list(ref_synthesizer.parameters()))
    for got, want in zip(block.parameters(), want_block):
        torch.testing.assert_close(got.grad, want)
    for got, want in zip(synthesizer.parameters(), want_synth):
        torch.testing.assert_close(got.grad, want)
    torch.testing.assert_close(interface.last_target, d)
    torch.testing.assert_close(interface.last_synthetic, centred.detach() / B)


def test_dni_centres_every_interface_but_the_top_one():
    def centred(**options):
        model = DNI(make_net(), example_input=batch()[0], **options)
        return [interface.center for interface in model.interfaces]

    assert centred() == [True, True, False]
    assert centred(center_gradients=False) == [False, False, False]
    assert centred(blocks=["1"]) == [False]      # one interface: its target is the true one
    assert centred(blocks=["2", "0"]) == [True, False]   # call order decides, not the list's


def step_with_random_synthesizers(grad_scale):
    """One DNI step with non-zero linear synthesizers; returns the model, copies of the
    network and synthesizers from before the step, and the batch."""
    net = make_net()
    reference = copy.deepcopy(net)
    x, y = batch()
    model = DNI(net, synthesizer="linear", grad_scale=grad_scale, example_input=x)
    randomise_synthesizers(model)
    synth = copy.deepcopy(model.interfaces)
    dni_step(model, x, y)
    return model, reference, synth, x, y


@pytest.mark.parametrize("grad_scale", [1.0, 0.1])
def test_top_target_is_true_gradient_and_lower_targets_are_bootstrapped(grad_scale):
    """Targets are in the loss's units whatever grad_scale is: no compounding down the stack."""
    model, reference, synth, x, y = step_with_random_synthesizers(grad_scale)
    hs, out = activations(reference, x)
    top = torch.autograd.grad(F.cross_entropy(out, y), hs[-1])[0]
    torch.testing.assert_close(model.interfaces[-1].last_target, top)
    for i in range(2):
        h_i = hs[i].detach().requires_grad_()
        h_next = list(reference)[i + 1](h_i)
        g_next = synth[i + 1].predict(h_next) / B  # the synthetic gradient block i+1 received
        want = torch.autograd.grad((g_next.detach() * h_next).sum(), h_i)[0]
        torch.testing.assert_close(model.interfaces[i].last_target, want)
    for i, interface in enumerate(model.interfaces):   # what each block received, unscaled
        torch.testing.assert_close(interface.last_synthetic, synth[i].predict(hs[i]) / B)


@pytest.mark.parametrize("grad_scale", [1.0, 0.1])
def test_synthesizer_gradient_is_the_regression_loss_gradient(grad_scale):
    model, reference, synth, x, _ = step_with_random_synthesizers(grad_scale)
    hs, _ = activations(reference, x)
    for i, interface in enumerate(model.interfaces):
        target = interface.last_target.detach() * B
        params = list(synth[i].parameters())
        loss = synthesizer_loss(synth[i].predict(hs[i]), target)
        torch.testing.assert_close(interface.last_loss, loss.detach())
        want = torch.autograd.grad(loss, params)
        for got, expected in zip(interface.parameters(), want):
            torch.testing.assert_close(got.grad, expected)


def test_zero_init_gives_lower_blocks_exactly_zero_gradient():
    net = make_net()
    x, y = batch()
    model = DNI(net, synthesizer="mlp", hidden_size=16, example_input=x)
    dni_step(model, x, y)
    for p in [p for block in list(net)[:3] for p in block.parameters()]:
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    head = list(net)[-1]
    assert all(torch.count_nonzero(p.grad) > 0 for p in head.parameters())


def test_true_loss_gradient_never_leaks_below_an_interface():
    x, y = batch()
    grads = []
    for scale in (1.0, 1000.0):
        net = make_net()
        model = DNI(net, synthesizer="linear", example_input=x)
        randomise_synthesizers(model)
        dni_step(model, x, y, scale=scale)
        grads.append((block_grads(net, 3), list(net)[-1].weight.grad.clone()))
    for a, b in zip(grads[0][0], grads[1][0]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(grads[1][1], 1000 * grads[0][1])


def test_blocks_are_update_unlocked():
    """Block i has its parameter gradient before block i+1's forward begins."""
    net = make_net()
    x, y = batch()
    model = DNI(net, synthesizer="linear", example_input=x)
    randomise_synthesizers(model)
    seen = []
    blocks = list(net)
    for i in range(1, 4):
        blocks[i].register_forward_pre_hook(
            lambda m, a, i=i: seen.append(blocks[i - 1][0].weight.grad is not None))
    dni_step(model, x, y)
    assert seen == [True, True, True]


def test_grad_scale_and_sum_reduction():
    """With batch_mean=False the block receives grad_scale * S(h) unchanged by the batch size."""
    torch.manual_seed(3)
    block = nn.Linear(D_IN, WIDTH).double()
    interface = Interface(LinearSynthesizer(WIDTH), grad_scale=0.1, batch_mean=False).double()
    with torch.no_grad():
        for p in interface.parameters():
            p.normal_()
    x, _ = batch()
    h = block(x)
    g = interface.predict(h).detach()
    interface(h).pow(2).sum().backward()
    want = torch.autograd.grad((0.1 * g * block(x)).sum(), list(block.parameters()))
    for got, expected in zip(block.parameters(), want):
        torch.testing.assert_close(got.grad, expected)
    torch.testing.assert_close(interface.last_synthetic, g)        # summed loss: S itself
    torch.testing.assert_close(interface.last_target, 2 * h.detach())


def test_forward_unlock_input_synthesizer():
    net = make_net()
    x, y = batch()
    model = DNI(net, synthesizer="linear", forward_unlock=True, example_input=x)
    randomise_synthesizers(model)
    unlock = [copy.deepcopy(i.input_synthesizer) for i in model.interfaces]
    reference = copy.deepcopy(net)
    outputs = []

    def record(module, args, output):
        outputs.append(output.detach().clone())

    handle = list(net)[2].register_forward_hook(record)
    dni_step(model, x, y)
    # I_i is trained on ||I(x) - h_i||^2 where h_i is block i's output in this pass
    h0 = reference[0](x).detach()
    loss = synthesizer_loss(unlock[0](x), h0)
    want = torch.autograd.grad(loss, list(unlock[0].parameters()))
    for got, expected in zip(model.interfaces[0].input_synthesizer.parameters(), want):
        torch.testing.assert_close(got.grad, expected)
    # block 3 runs on a synthetic input: changing block 2's weights does not change its output
    with torch.no_grad():
        list(net)[1][0].weight.mul_(3.0)
    dni_step(model, x, y)
    handle.remove()
    torch.testing.assert_close(outputs[0], outputs[1])
    # at test time the real chain runs
    model.eval()
    torch.testing.assert_close(model(x), net(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    x, y = batch()
    cpu_net = make_net()
    gpu_net = copy.deepcopy(cpu_net).cuda()
    cpu = DNI(cpu_net, synthesizer="linear", example_input=x)
    gpu = DNI(gpu_net, synthesizer="linear", example_input=x.cuda())
    randomise_synthesizers(cpu)
    gpu.interfaces.load_state_dict(cpu.interfaces.state_dict())
    dni_step(cpu, x, y)
    dni_step(gpu, x.cuda(), y.cuda())
    for a, b in zip(cpu_net.parameters(), gpu_net.parameters()):
        torch.testing.assert_close(a.grad, b.grad.cpu())
