"""The decoupled neural interface: the synthetic-gradient algorithm for one block edge.

For a block f_i with output h_i, the next block f_{i+1} and a loss averaged over B examples:

    g_i = S_i(h_i.detach(), c) / B        synthetic gradient (c: context, e.g. one-hot label)
    h_i.backward(scale * g_i)             block i has its gradient now (update-unlocked)
    in_{i+1} = bridge(h_i.detach(), g_i)  block i+1's input: a copy of h_i, no path below it
    fit S_i on ||S_i - B d_i||^2          summed over features, mean over the batch

d_i is the gradient block i+1's backward delivers at its input (the true dL/dh at the top
interface, below it block i+1's synthetic gradient pushed back through f_{i+1}), divided by
the grad_scale it was sent under: every synthesizer predicts the per-example gradient in the
loss's units, `scale` multiplies only what block i receives, and scales never compound down a
stack. The true loss gradient never reaches the blocks below an interface. Block i+1 may write
its input in place (ReLU(inplace=True) first). Where in_{i+1} reaches the loss along several
paths (a skip into the head), d_i is the sum of what comes back along all of them; block i
still receives only g_i. `batch_mean=False` (a loss summed over the batch) makes B = 1.
A 3-D activation is a sequence (B, T, d) whose loss averages over all B T positions: B is then
B T (`examples_in`, the one place this is decided), for the units, the fit and the centring.
"""

from __future__ import annotations

import torch
from torch import nn

# The grad_scale under which a gradient is being back-propagated right now: 1 during the loss's
# own backward, interface j's scale during its h_j.backward(scale_j * S_j / B). Why it exists:
# interface i's target d_i must be in the loss's units, but the gradient reaching its bridge
# carries the scale of whichever backward delivered it (the loss's, or interface i+1's, which
# runs inside the forward pass, nested in nothing the bridge can see). The bridge reads the top
# of this stack to undo it (dni/reference.py does the same with `sent_under`). Process-wide, not
# thread-local: autograd may run a backward on its own device threads.
_delivery_scales: list[float] = [1.0]


def examples_in(h: torch.Tensor) -> int:
    """How many examples a batch-mean loss averages over at activation h: the batch size B
    for vectors (B, d) and feature maps (B, C, H, W); B T for a sequence (B, T, d), whose
    loss averages over every position."""
    return h.shape[0] * h.shape[1] if h.dim() == 3 else h.shape[0]


def example_mean(h: torch.Tensor) -> torch.Tensor:
    """The mean of h over its examples (`examples_in`), keeping dimensions for broadcasting."""
    return h.mean((0, 1) if h.dim() == 3 else 0, keepdim=True)


def synthesizer_loss(synthetic: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Regression loss of a synthetic gradient on its target: squared error summed over
    features, averaged over the examples (the batch, and a sequence's positions)."""
    return (synthetic - target).pow(2).sum() / examples_in(synthetic)


class _Bridge(torch.autograd.Function):
    """Identity on `value` (a copy); backward trains the synthesizer's output S towards the
    gradient d arriving from above, and stops d there. `applied` = scale * S / unit is the
    gradient the block below received; working from it spares tensor operations on the hot
    path. Each backward pass that reaches the bridge brings its part of d (block i+1's
    synthetic one during the forward pass, the loss's after it, so the interfaces keep their
    graphs): the regression gradient is linear in d, so the first pass brings
    (2 / B) (S - unit d) for its part and each later one -(2 / B) unit d for its own."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, synthetic: torch.Tensor, applied: torch.Tensor,
                interface: Interface, unit: float):
        ctx.save_for_backward(applied)
        ctx.interface, ctx.unit, ctx.arrivals = interface, unit, 0
        # a copy, not a view: autograd forbids writing a custom Function's view in place, and
        # the next block's in-place first operation must not overwrite the h that S saved
        return value.clone()

    @staticmethod
    def backward(ctx, incoming: torch.Tensor):
        applied, = ctx.saved_tensors
        scale, unit, batch = ctx.interface.grad_scale, ctx.unit, examples_in(applied)
        # the target d is the incoming gradient without the grad_scale it was sent under, so
        # every synthesizer predicts the gradient in the loss's units (no compounding)
        delivered = _delivery_scales[-1]
        ctx.arrivals += 1
        first = ctx.arrivals == 1
        # d synthesizer_loss(S, unit d) / dS = (2 / B) (S - unit d)
        #                                    = (2 unit / (B scale)) (applied - scale d);
        # a later path's part d' of d adds -(2 unit / (B scale)) scale d'
        if first:
            grad = torch.sub(applied, incoming, alpha=scale / delivered)
        else:
            grad = incoming * (-scale / delivered)
        grad.mul_(2.0 * unit / (batch * scale))
        ctx.interface._record(incoming, delivered, grad, first)
        return None, grad, None, None, None


class Interface(nn.Module):
    """A decoupled neural interface after one block: applies the synthesizer's gradient to the
    block at once and trains the synthesizer on the gradient that comes back from above.

    Usage: `next_input = Interface(LinearSynthesizer(256))(h, context)` inside a forward pass.
    With an `input_synthesizer` (forward unlocking), the next block is fed a prediction of h
    made from the network input, so it need not wait for the blocks below. `center=True`
    subtracts the batch mean from every synthetic gradient (a batch of one gets none): the
    synthesizer is then fit, and the block driven, by the part of the gradient that differs
    between examples. `DNI` sets it where the target is itself synthetic (bench/README.md,
    "Centring the synthetic gradients").
    """

    def __init__(self, synthesizer: nn.Module, grad_scale: float = 1.0,
                 input_synthesizer: nn.Module | None = None, batch_mean: bool = True,
                 center: bool = False):
        super().__init__()
        self.synthesizer = synthesizer
        self.grad_scale = grad_scale
        self.input_synthesizer = input_synthesizer
        self.batch_mean = batch_mean
        self.center = center
        if not grad_scale > 0:
            raise ValueError(f"grad_scale must be positive, got {grad_scale}")
        self._incoming: tuple[torch.Tensor, float] | None = None  # last step's gradient, scale
        self.last_input_loss: torch.Tensor | None = None   # input synthesizer loss, last step
        self._loss_grad: torch.Tensor | None = None        # d loss / dS of the last step

    @property
    def last_target(self) -> torch.Tensor | None:
        """The last step's regression target d_i in the loss's units (None before the first)."""
        if self._incoming is None:
            return None
        incoming, delivered = self._incoming
        return incoming if delivered == 1.0 else incoming / delivered

    def _last_residual(self) -> torch.Tensor | None:
        """S - unit d of the last step, in the synthesizer's units: the bridge's loss gradient
        is (2 / B) (S - unit d)."""
        if self._loss_grad is None:
            return None
        return self._loss_grad * (examples_in(self._loss_grad) / 2.0)

    @property
    def last_synthetic(self) -> torch.Tensor | None:
        """The last step's synthetic gradient g_i as the block received it, without grad_scale:
        in the loss's units, like `last_target` (None before the first target arrives)."""
        residual = self._last_residual()
        if residual is None:
            return None
        return self.last_target + residual / self.unit(residual)    # g = d + (S - unit d) / unit

    @property
    def last_loss(self) -> torch.Tensor | None:
        """The synthesizer's regression loss on the last step (None before the first)."""
        residual = self._last_residual()
        return None if residual is None else residual.pow(2).sum() / examples_in(residual)

    def unit(self, h: torch.Tensor) -> float:
        """How many loss units one per-example synthesizer unit is: the number of examples
        (`examples_in`: a sequence's positions count) for a batch-mean loss, else 1."""
        return float(examples_in(h)) if self.batch_mean else 1.0

    def predict(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """S(h.detach(), c): the per-example synthetic gradient (centred over the batch when
        `center`; over a sequence's positions too), with the graph into the synthesizer's
        parameters."""
        if context is None:
            out = self.synthesizer(h.detach(), None)
        else:
            out = self.synthesizer(h.detach(), None, context=context)
        out = out[0] if isinstance(out, tuple) else out
        if self.center:   # a batch of one centres to zero: no example to tell it from
            out = out - example_mean(out)
        return out

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None,
                net_input: torch.Tensor | None = None) -> torch.Tensor:
        """Send the synthetic gradient into h's block now; return the next block's input."""
        synthetic = self.predict(h, context)
        unit = self.unit(h)
        applied = self.send_gradient(h, synthetic)
        value = h.detach()
        if self.input_synthesizer is not None:
            value = self._synthetic_input(net_input, context, value)
        if not synthetic.requires_grad:  # synthesizer without trainable parameters
            return value
        return _Bridge.apply(value, synthetic, applied, self, unit)

    def send_gradient(self, h: torch.Tensor, synthetic: torch.Tensor) -> torch.Tensor:
        """Back-propagate grad_scale * S / unit into h's block now; return that gradient."""
        applied = synthetic.detach() * (self.grad_scale / self.unit(h))
        if h.requires_grad:
            _delivery_scales.append(self.grad_scale)  # for the interfaces this passes through
            try:
                # kept: an interface below may get more of its target later by another path
                # (the graph goes when h and the next block's input are dropped)
                h.backward(applied, retain_graph=True)
            finally:
                _delivery_scales.pop()
        return applied

    def _synthetic_input(self, net_input: torch.Tensor | None, context: torch.Tensor | None,
                         h: torch.Tensor) -> torch.Tensor:
        """Forward unlocking: train I(x, c) on ||I(x, c) - h||^2 and return its prediction."""
        if net_input is None:
            raise ValueError("an input synthesizer needs the network input (net_input=)")
        predicted = self.input_synthesizer(net_input, context)
        loss = synthesizer_loss(predicted, h)
        loss.backward()
        self.last_input_loss = loss.detach()
        return predicted.detach()

    def _record(self, incoming: torch.Tensor, delivered: float, loss_grad: torch.Tensor,
                first: bool = True) -> None:
        """Keep this step's incoming gradient and loss gradient (the first path's, or added to
        the earlier paths' for a later one); target and loss are computed only when read."""
        if first:
            self._incoming, self._loss_grad = (incoming, delivered), loss_grad
        else:
            self._incoming = (self.last_target + incoming / delivered, 1.0)
            self._loss_grad = self._loss_grad + loss_grad
