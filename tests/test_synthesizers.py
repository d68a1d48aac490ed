"""Every synthesizer: the Synthesizer contract, zero start, shapes, and the context."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dni import (
    ConvSynthesizer,
    InputSynthesizer,
    LinearSigmoidSynthesizer,
    LinearSynthesizer,
    LossGradientSynthesizer,
    MLPSynthesizer,
    RNNSynthesizer,
    Synthesizer,
)


def perturb(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


VECTOR_KINDS = [
    lambda k: LinearSynthesizer(6, context_size=k),
    lambda k: LinearSynthesizer(6, hidden_size=4, num_layers=2, context_size=k),
    lambda k: LinearSigmoidSynthesizer(6, context_size=k),
    lambda k: MLPSynthesizer(6, hidden_size=8, context_size=k),
]


@pytest.mark.parametrize("make", VECTOR_KINDS)
def test_vector_synthesizers_start_at_zero_and_keep_shape(make):
    synth = make(0)
    out, hidden = synth(torch.randn(5, 6), None)
    assert out.shape == (5, 6) and hidden is None
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("make", VECTOR_KINDS)
def test_vector_synthesizers_use_the_context(make):
    synth = make(3)
    perturb(synth)
    synth.eval()
    h = torch.randn(4, 6)
    a, _ = synth(h, None, context=torch.eye(3)[[0, 0, 0, 0]])
    b, _ = synth(h, None, context=torch.eye(3)[[1, 1, 1, 1]])
    assert not torch.allclose(a, b)


def test_linear_sigmoid_is_bounded():
    synth = LinearSigmoidSynthesizer(6)
    with torch.no_grad():
        synth.net[-1].weight.fill_(100.0)
    out, _ = synth(torch.randn(50, 6), None)
    assert out.abs().max() <= 0.5


@pytest.mark.parametrize("mode", ["map", "bias", "channels"])
def test_conv_synthesizer_keeps_feature_map_shape_and_uses_context(mode):
    synth = ConvSynthesizer(4, hidden_size=6, context_size=3, kernel_size=3, context_mode=mode,
                     map_size=(7, 7))
    h = torch.randn(2, 4, 7, 7)
    out, _ = synth(h, None, context=torch.eye(3)[[0, 1]])
    assert out.shape == h.shape and torch.count_nonzero(out) == 0
    perturb(synth)
    synth.eval()
    a, _ = synth(h, None, context=torch.eye(3)[[0, 0]])
    b, _ = synth(h, None, context=torch.eye(3)[[2, 2]])
    assert not torch.allclose(a, b)


def test_conv_context_map_gives_each_class_its_own_spatial_template():
    # the top CNN gradient under a linear head, W^T (p - y), holds a (C, H, W) template per
    # class: the map projection must be able to produce any of them, whatever the input
    synth = ConvSynthesizer(2, hidden_size=3, context_size=4, kernel_size=3, map_size=(5, 5))
    assert synth.context_mode == "map"
    templates = torch.randn(4, 2, 5, 5)
    with torch.no_grad():
        synth.context_proj.weight.copy_(templates.reshape(4, -1).T)
    labels = torch.tensor([3, 0, 2])
    out, _ = synth(torch.randn(3, 2, 5, 5), None, context=torch.eye(4)[labels])
    torch.testing.assert_close(out, templates[labels])  # the conv stack's output is still 0


def test_conv_context_map_needs_its_size():
    with pytest.raises(ValueError, match="map_size"):
        ConvSynthesizer(2, context_size=4, context_mode="map")


def test_single_layer_conv_synthesizer():
    out, _ = ConvSynthesizer(4, num_layers=1, context_size=2)(torch.randn(2, 4, 5, 5), None,
                                                       context=torch.eye(2))
    assert out.shape == (2, 4, 5, 5)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_rnn_synthesizer_shape_contract(kind):
    synth = RNNSynthesizer(6, hidden_size=5, num_layers=2, kind=kind, context_size=2)
    c = torch.eye(2)[[0, 1, 1]]
    out, hidden = synth(torch.randn(3, 6), None, context=c)          # one step
    assert out.shape == (3, 6) and torch.count_nonzero(out) == 0
    out, hidden2 = synth(torch.randn(4, 3, 6), hidden, context=c)    # a sequence, state carried
    assert out.shape == (4, 3, 6)
    state = hidden2[0] if kind == "lstm" else hidden2
    assert state.shape == (2, 3, 5)


def test_rnn_synthesizer_hidden_state_matters():
    synth = RNNSynthesizer(3, hidden_size=4)
    perturb(synth)
    x = torch.randn(2, 3)
    _, hidden = synth(torch.randn(2, 3), None)
    assert not torch.allclose(synth(x, None)[0], synth(x, hidden)[0])


def test_custom_dni_network_contract():
    class Scaled(Synthesizer):
        def __init__(self, n):
            super().__init__(n)
            self.scale = nn.Parameter(torch.zeros(()))

        def forward(self, input, hidden=None, context=None):
            return self.scale * input, hidden

    synth = Scaled(4)
    assert synth.output_size == 4
    out, _ = synth(torch.ones(2, 4), None)
    assert out.shape == (2, 4)
    with pytest.raises(NotImplementedError):
        Synthesizer(3)(torch.ones(1, 3))


def test_input_synthesizer_shape():
    unlock = InputSynthesizer(12, (4, 3, 3), hidden_size=8, context_size=2)
    out = unlock(torch.randn(5, 1, 3, 4), torch.eye(2)[[0, 1, 0, 1, 0]])
    assert out.shape == (5, 4, 3, 3)


def test_loss_gradient_synthesizer_is_a_scaled_softmax_loss_gradient_per_position():
    """S(h, y) = a d/dh CE(W h + b, y) at every position of a (B, T, d) sequence, as autograd
    gives it; zero at the start (a = 0); no context is refused."""
    synth = LossGradientSynthesizer(6, context_size=5)
    h, labels = torch.randn(2, 3, 6), torch.randint(0, 5, (2, 3))
    out, hidden = synth(h, None, context=F.one_hot(labels, 5).float())
    assert out.shape == h.shape and hidden is None and torch.count_nonzero(out) == 0
    with torch.no_grad():
        synth.scale.fill_(0.7)
    out, _ = synth(h, None, context=F.one_hot(labels, 5).float())
    h_in = h.clone().requires_grad_()
    loss = F.cross_entropy(synth.head(h_in).reshape(-1, 5), labels.reshape(-1), reduction="sum")
    want, = torch.autograd.grad(0.7 * loss, h_in)
    assert torch.allclose(out, want, atol=1e-6)
    with pytest.raises(ValueError, match="needs the labels"):
        synth(h, None)
    with pytest.raises(ValueError, match="needs the labels as context"):
        LossGradientSynthesizer(6)
