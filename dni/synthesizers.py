"""Synthesizers: small networks that predict the gradient of the loss with respect to an
activation (or, for forward unlocking, the activation itself). Every one ends in a layer that
starts at zero, weights and bias, so training starts from "no gradient" rather than noise.

All follow the `Synthesizer` contract: `forward(input, hidden=None, context=None)` returns
`(output, hidden)`; `hidden` is None except for recurrent synthesizers.

The vector synthesizers (linear, linear-sigmoid, MLP) act on the last dimension: on a
sequence (B, T, d) they act per position, one map over d shared by every position, so their
size does not depend on T and a sequence is never flattened into one T d vector. The context
is then per position (B, T, k), e.g. each position's target token, or one per sequence (B, k).
`SequenceConvSynthesizer` also looks along the sequence, at the later positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def zero_init_(layer: nn.Module) -> nn.Module:
    """Set a layer's weight and bias to zero, in place; return it."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def append_context(h: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """[h, c] along the last dimension; h alone without a context. For vectors h (B, d) the
    context is flattened to (B, k); for a sequence h (B, T, d) it is (B, T, k), one per
    position, or (B, k), the same at every position."""
    if context is None:
        return h
    c = context.to(h.dtype)
    if h.dim() == 2:
        c = c.reshape(len(c), -1)
    elif c.dim() == 2:
        c = c.view(len(c), *([1] * (h.dim() - 2)), -1).expand(*h.shape[:-1], -1)
    return torch.cat([h, c], dim=-1)


def per_position(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`net` (rows in, rows out) applied to every position of x (B, ..., k) as one batch of
    rows, so a BatchNorm in it counts the positions into the batch."""
    if x.dim() == 2:
        return net(x)
    return net(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)


class Synthesizer(nn.Module):
    """Base class of synthesizers: `forward(input, hidden=None, context=None) -> (output,
    hidden)`. Subclass it for a custom synthesizer; end in a zero-initialised layer.

    Usage: `class MyDNI(Synthesizer): def forward(self, input, hidden, context=None): ...`
    """

    def __init__(self, input_size: int, hidden_size: int = 0, output_size: int | None = None,
                 context_size: int = 0):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = input_size if output_size is None else output_size
        self.context_size = context_size

    def forward(self, input: torch.Tensor, hidden=None, context: torch.Tensor | None = None):
        """Return (synthetic output, new hidden state)."""
        raise NotImplementedError


class LinearSynthesizer(Synthesizer):
    """Linear synthesizer: g = W [h, c] + b (the paper's linear SG; cDNI when c is given).
    With `num_layers=2` it is the product of two linear maps through `hidden_size` units (a
    low-rank linear synthesizer)."""

    def __init__(self, input_size: int, hidden_size: int = 0, output_size: int | None = None,
                 context_size: int = 0, num_layers: int = 1):
        super().__init__(input_size, hidden_size, output_size, context_size)
        if num_layers not in (1, 2):
            raise ValueError("LinearSynthesizer has 1 or 2 layers")
        layers: list[nn.Module] = []
        width = input_size + context_size
        if num_layers == 2:
            layers.append(nn.Linear(width, hidden_size))
            width = hidden_size
        layers.append(zero_init_(nn.Linear(width, self.output_size)))
        self.net = nn.Sequential(*layers)

    def forward(self, input, hidden=None, context=None):
        """Return (W [h, c] + b, None)."""
        return per_position(self.net, append_context(input, context)), None


class LinearSigmoidSynthesizer(LinearSynthesizer):
    """Bounded synthesizer for log losses (Czarnecki et al. 2017): g = sigmoid(W [h, c] + b)
    - 1/2, a pointwise sigmoid on a linear SG, shifted so that the zero start gives zero."""

    def forward(self, input, hidden=None, context=None):
        """Return (sigmoid(W [h, c] + b) - 1/2, None)."""
        return torch.sigmoid(per_position(self.net, append_context(input, context))) - 0.5, None


class LossGradientSynthesizer(Synthesizer):
    """A synthesizer shaped like a softmax loss's gradient, for cDNI with class labels as
    context: g = a W^T (softmax(W h + b) - y), y the one-hot label (per position on a
    sequence). It is the gradient in h of a (learned) linear classifier's cross-entropy, so
    the block below descends a loss that is bounded below, and its sum over a batch cancels
    as the true gradient's does; exact for a linear head. W, b and a are fit by the usual
    regression; a starts at zero. Usage: `LossGradientSynthesizer(128, context_size=vocab)`."""

    def __init__(self, input_size: int, hidden_size: int = 0, output_size: int | None = None,
                 context_size: int = 0):
        super().__init__(input_size, hidden_size, output_size, context_size)
        if context_size < 2:
            raise ValueError("the loss_gradient synthesizer needs the labels as context "
                             "(cDNI, context_size = the number of classes)")
        if self.output_size != input_size:
            raise ValueError("the loss_gradient synthesizer's output has the input's size")
        self.head = nn.Linear(input_size, context_size)
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, input, hidden=None, context=None):
        """Return (a W^T (softmax(W h + b) - y), None)."""
        if context is None:
            raise ValueError("the loss_gradient synthesizer needs the labels (context=)")
        labels = context.to(input.dtype)
        if input.dim() == 3 and labels.dim() == 2:    # one label per sequence
            labels = labels[:, None, :]
        error = torch.softmax(self.head(input), dim=-1) - labels
        return self.scale * (error @ self.head.weight), None


class MLPSynthesizer(Synthesizer):
    """The paper's MLP synthesizer: `num_layers - 1` hidden layers of Linear -> BatchNorm ->
    ReLU with `hidden_size` units, then a zero-initialised Linear. Usage:
    `MLPSynthesizer(256, hidden_size=1024, num_layers=3)`."""

    def __init__(self, input_size: int, hidden_size: int = 1024, output_size: int | None = None,
                 context_size: int = 0, num_layers: int = 3, batch_norm: bool = True):
        super().__init__(input_size, hidden_size, output_size, context_size)
        layers: list[nn.Module] = []
        width = input_size + context_size
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_size)]
            layers += [nn.BatchNorm1d(hidden_size)] if batch_norm else []
            layers += [nn.ReLU()]
            width = hidden_size
        layers.append(zero_init_(nn.Linear(width, self.output_size)))
        self.net = nn.Sequential(*layers)

    def forward(self, input, hidden=None, context=None):
        """Return (MLP([h, c]), None)."""
        return per_position(self.net, append_context(input, context)), None


CONTEXT_MODES = ("map", "bias", "channels")


class ConvSynthesizer(Synthesizer):
    """Shape-preserving conv synthesizer for feature maps (B, C, H, W): `num_layers - 1` hidden
    kxk convs with BatchNorm and ReLU, then a zero-initialised kxk conv back to C channels.

    The context c (cDNI) enters in one of three ways (`context_mode`):
    - "map": a zero-initialised linear map from c onto the whole output map (C, H, W), added
      to the conv stack's output; it can give every class its own spatial template, as the
      gradient W^T y under a linear head is. Needs `map_size=(H, W)`.
    - "bias": a projection of c added per channel after the first conv (constant over space).
    - "channels": c as extra constant input channels.
    Usage: `ConvSynthesizer(64, context_size=10, map_size=(7, 7))`.
    """

    def __init__(self, input_size: int, hidden_size: int = 64, output_size: int | None = None,
                 context_size: int = 0, num_layers: int = 3, kernel_size: int = 5,
                 context_mode: str | None = None, map_size: tuple[int, int] | None = None):
        super().__init__(input_size, hidden_size, output_size, context_size)
        if context_mode is None:
            context_mode = "map" if map_size is not None else "bias"
        if context_mode not in CONTEXT_MODES:
            raise ValueError(f"context_mode must be one of {CONTEXT_MODES}, got {context_mode!r}")
        if context_mode == "map" and map_size is None:
            raise ValueError("context_mode='map' needs map_size=(H, W)")
        self.context_mode = context_mode if context_size else None
        self.map_size = None if map_size is None else tuple(map_size)
        pad = kernel_size // 2
        in_ch = input_size + (context_size if self.context_mode == "channels" else 0)
        self.hidden = nn.ModuleList()
        for _ in range(num_layers - 1):
            self.hidden.append(nn.Sequential(nn.Conv2d(in_ch, hidden_size, kernel_size,
                                                       padding=pad),
                                             nn.BatchNorm2d(hidden_size), nn.ReLU()))
            in_ch = hidden_size
        self.out = zero_init_(nn.Conv2d(in_ch, self.output_size, kernel_size, padding=pad))
        self.context_proj: nn.Linear | None = None
        if self.context_mode == "bias":
            first_width = hidden_size if num_layers > 1 else self.output_size
            self.context_proj = nn.Linear(context_size, first_width, bias=False)
        elif self.context_mode == "map":
            height, width = self.map_size
            self.context_proj = zero_init_(nn.Linear(context_size,
                                                     self.output_size * height * width,
                                                     bias=False))

    def forward(self, input, hidden=None, context=None):
        """Return (conv stack on the feature map with the context mixed in, None)."""
        x = input
        mode = self.context_mode if context is not None else None
        if mode is not None:
            context = context.reshape(len(context), -1).to(x.dtype)
        if mode == "channels":
            planes = context[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, planes], dim=1)
        layers = list(self.hidden) + [self.out]
        for i, layer in enumerate(layers):
            if i == 0 and mode == "bias":
                conv = layer[0] if isinstance(layer, nn.Sequential) else layer
                y = conv(x) + self.context_proj(context)[:, :, None, None]
                x = layer[1:](y) if isinstance(layer, nn.Sequential) else y
            else:
                x = layer(x)
        if mode == "map":
            x = x + self.context_proj(context).view(len(x), self.output_size, *self.map_size)
        return x, None


class SequenceConvSynthesizer(Synthesizer):
    """A synthesizer that looks along a sequence (B, T, d), at later positions above all: in a
    causal model the gradient at position t gathers the losses of t and of every later
    position that attends to it. Per position [h, c] -> `hidden_size` units (Linear, GELU),
    then a depthwise convolution over time that is anti-causal (position t sees t .. t +
    kernel_size - 1), GELU, and a zero-initialised Linear back to d; beside it a
    zero-initialised per-position linear map of [h, c] (the per-position linear synthesizer),
    added. No loss goes in, so seeing later positions leaks nothing. Its size does not depend
    on T. Usage: `SequenceConvSynthesizer(128, hidden_size=128, kernel_size=16)`."""

    def __init__(self, input_size: int, hidden_size: int = 128, output_size: int | None = None,
                 context_size: int = 0, kernel_size: int = 16):
        super().__init__(input_size, hidden_size, output_size, context_size)
        width = input_size + context_size
        self.kernel_size = kernel_size
        self.direct = zero_init_(nn.Linear(width, self.output_size))
        self.into = nn.Linear(width, hidden_size)
        self.along = nn.Conv1d(hidden_size, hidden_size, kernel_size, groups=hidden_size)
        self.out = zero_init_(nn.Linear(hidden_size, self.output_size))

    def forward(self, input, hidden=None, context=None):
        """Return (per-position linear map + the anti-causal conv stack, None)."""
        if input.dim() != 3:
            raise ValueError(f"SequenceConvSynthesizer needs (B, T, d) input, got "
                             f"{tuple(input.shape)}")
        x = append_context(input, context)
        u = F.gelu(self.into(x)).transpose(1, 2)                    # (B, hidden, T)
        u = F.gelu(self.along(F.pad(u, (0, self.kernel_size - 1))))  # pad the future side
        return self.direct(x) + self.out(u.transpose(1, 2)), None


RNN_KINDS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class RNNSynthesizer(Synthesizer):
    """Recurrent synthesizer: a stacked LSTM, GRU or RNN over the inputs it is given, then a
    zero-initialised Linear. Input (B, input_size) for one step or (T, B, input_size) for a
    sequence; output of the same leading shape; `hidden` is the RNN's state, carried by the
    caller between calls (None starts from zero)."""

    def __init__(self, input_size: int, hidden_size: int = 64, output_size: int | None = None,
                 context_size: int = 0, num_layers: int = 1, kind: str = "lstm"):
        super().__init__(input_size, hidden_size, output_size, context_size)
        if kind not in RNN_KINDS:
            raise ValueError(f"kind must be one of {sorted(RNN_KINDS)}")
        self.rnn = RNN_KINDS[kind](input_size + context_size, hidden_size, num_layers)
        self.out = zero_init_(nn.Linear(hidden_size, self.output_size))

    def forward(self, input, hidden=None, context=None):
        """Return (synthetic output, new RNN state)."""
        one_step = input.dim() == 2
        x = input.unsqueeze(0) if one_step else input
        if context is not None:  # (B, k), the same at every step
            c = context.reshape(len(context), -1).to(x.dtype)
            x = torch.cat([x, c.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=2)
        y, hidden = self.rnn(x, hidden)
        out = self.out(y)
        return (out[0] if one_step else out), hidden


class InputSynthesizer(nn.Module):
    """Forward unlocking: predicts a block's input activation (shape `output_shape`, batch
    excluded) from the network input and context with an MLP; trained on ||I(x, c) - h||^2.
    Usage: `InputSynthesizer(784, (256,), context_size=10)`."""

    def __init__(self, input_size: int, output_shape: tuple[int, ...], hidden_size: int = 1024,
                 num_layers: int = 2, context_size: int = 0):
        super().__init__()
        self.output_shape = tuple(output_shape)
        out = math.prod(self.output_shape)
        layers: list[nn.Module] = []
        width = input_size + context_size
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_size), nn.ReLU()]
            width = hidden_size
        layers.append(nn.Linear(width, out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted activation (B, *output_shape)."""
        h = append_context(x.reshape(len(x), -1), context)
        return self.net(h).reshape(len(x), *self.output_shape)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels -> float one-hot; float contexts pass through unchanged."""
    if labels.dtype.is_floating_point:
        return labels
    return F.one_hot(labels, num_classes).float()


# The names users of the seed tools know (its README's API), kept as aliases of the classes.
Linear_DNI = LinearSynthesizer
Linear_Sigmoid_DNI = LinearSigmoidSynthesizer
RNN_DNI = RNNSynthesizer
DNI_Network = Synthesizer
# names of earlier versions of this library
MLP_DNI = MLPSynthesizer
Conv_DNI = ConvSynthesizer
