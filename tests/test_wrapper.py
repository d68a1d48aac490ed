"""DNI(net, optim=opt) on networks not built for it, with the training loop unchanged."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dni import DNI, Synthesizer


class ResidualMLP(nn.Module):
    """A residual MLP as a user would write it: stem, two residual blocks, head."""

    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.f = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

        def forward(self, x):
            return torch.relu(x + self.f(x))

    def __init__(self, d_in=10, width=32, classes=4):
        super().__init__()
        self.stem = nn.Linear(d_in, width)
        self.res1 = self.Block(width)
        self.res2 = self.Block(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.res2(self.res1(torch.relu(self.stem(x)))))


def blobs(n, seed, d=10, classes=4):
    """Gaussian clusters around fixed random centres: data the project does not ship."""
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(123)) * 1.3
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g), y


def train(net, wrap, epochs=15, seed=0, **dni_options):
    torch.manual_seed(seed)
    x, y = blobs(2000, seed=1)
    xt, yt = blobs(1000, seed=2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    if wrap:
        net = DNI(net, optim=opt, synthesizer_lr=1e-3, **dni_options)
    for _ in range(epochs):
        for i in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            loss = F.cross_entropy(net(x[i]), y[i])
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        return (net(xt).argmax(1) == yt).float().mean().item()


def test_trains_someone_elses_network_within_3_points_of_backprop():
    backprop = train(ResidualMLP(), wrap=False)
    dni = train(ResidualMLP(), wrap=True)
    assert backprop > 0.8
    assert dni >= backprop - 0.03, (dni, backprop)


def test_default_interfaces_follow_call_order_and_skip_the_last():
    net = ResidualMLP()
    model = DNI(net, optim=torch.optim.SGD(net.parameters(), lr=0.1),
                example_input=torch.randn(2, 10))
    assert model.block_names == ["stem", "res1", "res2"]


def test_blocks_can_be_named_and_synthesizers_join_the_optimizer():
    net = ResidualMLP()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    model = DNI(net, optim=opt, blocks=["res1"], synthesizer="mlp", hidden_size=8,
                synthesizer_lr=5e-4, example_input=torch.randn(2, 10))
    assert model.block_names == ["res1"]
    group = opt.param_groups[-1]
    assert group["lr"] == 5e-4
    assert {id(p) for p in group["params"]} == {id(p) for p in model.synthesizer_parameters()}
    with pytest.raises(ValueError, match="not submodules"):
        DNI(ResidualMLP(), blocks=["res1", "nope"], example_input=torch.randn(2, 10))
    unused = ResidualMLP()
    unused.spare = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="not called"):
        DNI(unused, blocks=["res1", "spare"], example_input=torch.randn(2, 10))


def test_without_optimizer_synthesizers_get_their_own():
    net = ResidualMLP()
    model = DNI(net, example_input=torch.randn(2, 10))
    assert isinstance(model.synthesizer_optimizer, torch.optim.Adam)


def test_eval_output_equals_inner_network_and_runs_no_synthesizer():
    torch.manual_seed(0)
    net = ResidualMLP()
    model = DNI(net, example_input=torch.randn(2, 10))
    calls = []
    for interface in model.interfaces:
        interface.synthesizer.register_forward_hook(lambda *a: calls.append(1))
    model.eval()
    x = torch.randn(5, 10)
    torch.testing.assert_close(model(x), net(x))
    assert calls == []
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x))
    assert calls == []


def test_custom_synthesizer_through_the_wrapper():
    class Constant(Synthesizer):
        """Predicts a learned constant gradient."""

        def __init__(self, n):
            super().__init__(n)
            self.value = nn.Parameter(torch.full((n,), 0.5))

        def forward(self, input, hidden=None, context=None):
            return self.value.expand_as(input), None

    net = ResidualMLP()
    model = DNI(net, synthesizer=lambda shape, k: Constant(shape[0]),
                example_input=torch.randn(2, 10), center_gradients=False)  # centred, 0
    x, y = blobs(8, seed=3)
    F.cross_entropy(model(x), y).backward()
    # stem got exactly the gradient of <0.5 / B, h> through its own output
    assert torch.count_nonzero(net.stem.weight.grad) > 0
    assert all(i.synthesizer.value.grad is not None for i in model.interfaces)


def test_cdni_context_changes_the_synthetic_gradient():
    torch.manual_seed(0)
    net = ResidualMLP()
    model = DNI(net, context_size=4, example_input=torch.randn(2, 10))
    with torch.no_grad():
        for p in model.synthesizer_parameters():
            p.normal_()
    x, y = blobs(8, seed=3)
    grads = []
    for labels in (y, (y + 1) % 4):
        net.zero_grad()
        model(x, context=labels)
        grads.append(net.stem.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])
    with pytest.raises(ValueError, match="context"):
        model(x)
    with pytest.raises(ValueError, match="context_size=0"):
        DNI(ResidualMLP(), example_input=torch.randn(2, 10))(x, context=y)


def test_gradient_cosines_do_not_touch_training():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 4))
    model = DNI(net, example_input=torch.randn(2, 10))
    with torch.no_grad():
        for p in model.synthesizer_parameters():
            p.normal_()
    x, y = blobs(32, seed=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cosines = model.gradient_cosines(F.cross_entropy, x, y)
    assert torch.equal(torch.get_rng_state(), rng)
    # two interfaces (the dropout layer gets none), but its mask is still drawn in the probe
    assert len(cosines) == 2 and all(-1 <= c <= 1 for c in cosines)
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_gradient_cosine_is_one_for_a_perfect_synthesizer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 16), nn.Linear(16, 4))  # top interface gradient is W^T(p-y)
    x, y = blobs(32, seed=3)

    class Exact(Synthesizer):
        def forward(self, input, hidden=None, context=None):
            p = torch.softmax(net[1](input), 1)
            return (p - F.one_hot(context.argmax(1), 4)) @ net[1].weight, None

    model = DNI(net, synthesizer=lambda shape, k: Exact(shape[0]), context_size=4,
                example_input=x)
    cosine, = model.gradient_cosines(F.cross_entropy, x, y, context=y)
    assert cosine == pytest.approx(1.0, abs=1e-6)


def test_a_block_called_twice_is_refused():
    class Reuses(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(self.act(x))))

    with pytest.raises(ValueError, match="called more than once"):
        DNI(Reuses(), example_input=torch.randn(2, 4))
    model = DNI(Reuses(), blocks=["fc1"], example_input=torch.randn(2, 4))
    assert model.block_names == ["fc1"]


def test_needs_two_blocks():
    with pytest.raises(ValueError, match="two blocks"):
        DNI(nn.Sequential(nn.Linear(3, 3)), example_input=torch.randn(2, 3))


def test_synthesizer_group_defaults_as_documented():
    """synthesizer_lr None takes the first group's learning rate as it is now; 0 or a
    negative rate is refused (it used to fall back silently); other settings follow the
    optimizer's defaults but weight decay, which is 0."""
    def build(opt, **options):
        return DNI(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)), optim=opt,
                   example_input=torch.randn(2, 10), **options)

    torch.manual_seed(0)
    probe = nn.Linear(10, 8)
    opt = torch.optim.AdamW([{"params": probe.parameters(), "lr": 3e-4}], lr=1e-2,
                            weight_decay=0.1, betas=(0.8, 0.9))
    build(opt)
    group = opt.param_groups[-1]
    assert group["lr"] == 3e-4 and group["weight_decay"] == 0.0 and group["betas"] == (0.8, 0.9)
    opt = torch.optim.SGD(probe.parameters(), lr=0.1, momentum=0.9)
    build(opt, synthesizer_lr=0.02)
    assert opt.param_groups[-1]["lr"] == 0.02 and opt.param_groups[-1]["momentum"] == 0.9
    for bad in (0, 0.0, -1e-3):
        with pytest.raises(ValueError, match="synthesizer_lr"):
            build(torch.optim.SGD(probe.parameters(), lr=0.1), synthesizer_lr=bad)


def test_an_interface_above_dropout_sits_below_it_and_its_target_carries_the_mask():
    """A block ending in dropout gets its interface before the dropout: the block receives
    S(h)/B at the unmasked h, and the synthesizer is fit on the true dL/dh there, which is
    zero wherever the mask dropped a unit."""
    import copy

    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Dropout(0.5)),
                        nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    model = DNI(net, example_input=x)
    assert model.block_names == ["0.1"] and not model.interfaces[0].center
    with torch.no_grad():
        for p in model.synthesizer_parameters():
            p.normal_(0, 0.3)
    reference, synthesizer = copy.deepcopy(net), copy.deepcopy(model.interfaces[0].synthesizer)

    torch.manual_seed(1)
    F.cross_entropy(model(x), y).backward()

    torch.manual_seed(1)                 # the same dropout mask: it is the only random draw
    block = reference[0]
    h = block[1](block[0](x))
    loss = F.cross_entropy(reference[1](block[2](h)), y)
    true, = torch.autograd.grad(loss, h, retain_graph=True)
    synthetic = synthesizer(h.detach())[0] / len(x)
    expected = torch.autograd.grad(h, list(block.parameters()), synthetic, retain_graph=True)
    loss.backward()                      # the head's gradients
    assert (true == 0).any() and (true != 0).any()
    torch.testing.assert_close(model.interfaces[0].last_target, true)
    for got, want in zip(net[0].parameters(), expected):
        torch.testing.assert_close(got.grad, want)
    for got, want in zip(net[1].parameters(), reference[1].parameters()):
        torch.testing.assert_close(got.grad, want.grad)


def test_dropout_layers_get_no_interface_of_their_own():
    flat = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.2), nn.Linear(6, 6),
                         nn.ReLU(), nn.AlphaDropout(0.1), nn.Linear(6, 2))
    assert DNI(flat, example_input=torch.randn(2, 4)).block_names == ["0", "1", "3", "4"]
    nested = nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.ReLU(), nn.Dropout()),
                                         nn.Dropout()), nn.Linear(6, 2))
    assert DNI(nested, example_input=torch.randn(2, 4)).block_names == ["0.1.0"]
    only_dropout = nn.Sequential(nn.Sequential(nn.Linear(4, 6)), nn.Sequential(nn.Dropout()),
                                 nn.Linear(6, 2))
    assert DNI(only_dropout, example_input=torch.randn(2, 4)).block_names == ["0"]
    as_before = DNI(flat, example_input=torch.randn(2, 4), cut_before_dropout=False)
    assert as_before.block_names == ["0", "1", "2", "3", "4", "5"]
    named = DNI(nested, blocks=["0"], example_input=torch.randn(2, 4))
    assert named.block_names == ["0.1.0"]


def test_the_cut_stays_at_blocks_it_cannot_look_into():
    """A Sequential subclass with its own forward (a skip path around the dropout) and an
    in-place dropout keep the interface at the block's output, and train."""
    class Residual(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    skip = nn.Sequential(nn.Linear(4, 6), Residual(nn.Linear(6, 6), nn.Dropout(0.5)),
                         nn.Linear(6, 2))
    in_place = nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6),
                                           nn.Dropout(0.5, inplace=True)),
                             nn.Linear(6, 2))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    for net, names in ((skip, ["0", "1"]), (in_place, ["0"])):
        model = DNI(net, optim=torch.optim.SGD(net.parameters(), lr=0.1), example_input=x)
        assert model.block_names == names
        F.cross_entropy(model(x), y).backward()
        assert all(p.grad is not None for p in net[0].parameters())


def test_a_module_shared_by_two_cut_blocks_is_refused_with_the_way_out():
    act = nn.ReLU()
    net = nn.Sequential(nn.Sequential(nn.Linear(4, 6), act, nn.Dropout()),
                        nn.Sequential(nn.Linear(6, 6), act, nn.Dropout()), nn.Linear(6, 2))
    with pytest.raises(ValueError, match="cut_before_dropout=False"):
        DNI(net, example_input=torch.randn(2, 4))
    assert DNI(net, example_input=torch.randn(2, 4), cut_before_dropout=False).block_names == [
        "0", "1"]
