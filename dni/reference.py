"""The DNI algorithm written out by hand, as the paper states it: start reading here.

One training step of a chain of blocks f_1 ... f_n (a synthesizer S_i after each) and a head,
for a loss averaged over a batch of B examples:

    for each block i, bottom to top:
        h_i = f_i(x_i)                       x_1 = the input, x_{i+1} = h_i cut from below
        g_i = S_i(h_i.detach())              the per-example synthetic gradient (B dL/dh_i)
        (center: g_i -= its batch mean)      every i but the top; not in the paper's DNI
        h_i.backward(scale * g_i / B)        block i learns now: it need not wait for the top
    L = loss(head(x_{n+1})); L.backward()    the head learns from the true loss
    for each interface i:
        d_i = B * x_{i+1}.grad / s_i         the true dL/dh_n at the top, else block i+1's
                                             synthetic gradient through f_{i+1}, in the loss's
                                             units: s_i = scale for i < n, s_n = 1
        fit S_i on ||g_i - d_i||^2           summed over features, averaged over the batch

`dni.Interface` (one edge) and `dni.DNI` (any network) compute the same step
(tests/test_reference.py); where x_{i+1} also reaches the loss by another path (a skip into
the head), d_i sums what comes back along every path, each with its own s (tests/test_paths.py).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dni.interface import example_mean, examples_in, synthesizer_loss


def reference_step(blocks: Sequence[nn.Module], synthesizers: Sequence[nn.Module],
                   head: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   scale: float = 1.0, context: torch.Tensor | None = None,
                   batch_mean: bool = True, center: bool = False) -> torch.Tensor:
    """Accumulate one step's gradients into every block, synthesizer and the head (the caller
    zeroes them before and steps the optimizer after); return the loss. `synthesizers[i]`
    maps (h, hidden=None[, context=]) to the per-example synthetic gradient (or (it, hidden)),
    as `dni.synthesizers`' modules do; `context` (cDNI) is e.g. the one-hot label;
    `batch_mean=False` for a loss summed over the batch (then B = 1 above); `center` centres
    the synthetic gradients below the top interface over the batch. For a sequence h_i
    (B, T, d) whose loss averages over all positions, B above is B T (dni.interface's
    `examples_in`)."""
    inputs, synthetic, units = [], [], []
    for i, (block, synthesizer) in enumerate(zip(blocks, synthesizers)):
        h = block(x)
        batch = examples_in(h) if batch_mean else 1     # a sequence's positions count
        kwargs = {} if context is None else {"context": context}
        g = synthesizer(h.detach(), None, **kwargs)
        g = g[0] if isinstance(g, tuple) else g
        if center and i + 1 < len(synthesizers):
            g = g - example_mean(g)
        h.backward(scale * g.detach() / batch)
        x = h.detach().requires_grad_()          # block i+1 sees h_i, no path below it
        inputs.append(x)
        synthetic.append(g)
        units.append(batch)
    loss = loss_fn(head(x), y)
    loss.backward()
    # what arrived at each block's input: interface i's target comes from block i+1's input,
    # under block i+1's synthetic gradient (scale) or, at the top, the loss (scale 1)
    fit = 0.0
    for i, g in enumerate(synthetic):
        sent_under = scale if i + 1 < len(synthetic) else 1.0
        arrived = inputs[i].grad if inputs[i].grad is not None else torch.zeros_like(inputs[i])
        target = units[i] * arrived / sent_under
        fit = fit + synthesizer_loss(g, target)
    if synthetic:
        fit.backward()
    return loss.detach()
