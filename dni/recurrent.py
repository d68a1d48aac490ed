"""Recurrent DNI: truncated backpropagation through time with a synthetic gradient of the
future at every chunk edge (Jaderberg et al. 2016, section 3.2).

    bptt = TruncatedBPTT(nn.LSTM(9, 128), truncation=3, readout=nn.Linear(128, 8),
                         synthesizer=LinearSynthesizer(2 * 128), discount=0.5)
    opt = torch.optim.Adam(bptt.parameters(), lr=1e-3)
    opt.zero_grad()
    report = bptt(inputs, lambda y, t0, t1: criterion(y, targets[t0:t1]))  # forward + backward
    opt.step()

A sequence is cut into chunks of T steps. For chunk k, with start state s (a detached leaf),
end state e and a batch-mean loss over B examples:

    loss_k = chunk_loss(readout(core(x[t0:t1], s)))       summed over the chunk's steps
    g_end  = discount * S(e.detach()) / B                 0 after the end of the sequence
    backward of loss_k + <g_end.detach(), e>
    fit S on ||S(s) - B * s.grad||^2                      the bootstrapped target at the start

S predicts the per-example gradient; `batch_mean=False` (summed losses) makes B = 1. The
discount lambda enters S's target too: S learns d_k = dloss_k/ds + lambda J_k^T S(e_k), the
lambda-discounted gradient of the future (`grad_scale=`: its deprecated name). A state tuple
(LSTM (h, c)) is flattened to one vector per example, (layers, B, H) tensors to
(B, layers * H) concatenated in order: S sees and predicts that vector.

DNI+Aux (`aux_weight > 0`, our reading of the paper's auxiliary task): a linear head A on the
core's output predicts, at every step of a chunk, the synthetic gradient sent into its end
undiscounted (S_bar's with a target synthesizer); `aux_weight * ||A(y_t) - S(e)||^2`, averaged
over the chunk's steps, trains A and the core only, never S's target.

`target_decay > 0`: the gradient sent into each chunk's end comes from a slow copy S_bar of S,
S_bar <- decay * S_bar + (1 - decay) * S at the start of every call; S is still fitted at the
chunk's start. Why, and what each option gave: bench/README.md, "The recurrent settings".

`center=True` sends, and fits S on, the synthetic gradient minus its batch mean. On a text
stream whose state is carried across calls (`continues=True`), an uncentred S learns a bias
that drives the LSTM cell state without bound (bench/README.md, "Recurrent DNI on a text
stream").

Gradients accumulate over all chunks; the caller steps the optimizer once per sequence batch.

Several independent runs in one call (`runs=K`, for one process training K seeds or settings
side by side): the batch holds K runs' examples, run-major (run k owns columns k*B .. k*B+B-1),
and the core, readout, synthesizers and aux head must keep the runs apart (one set of weights a
run, as `experiment.stacked_runs` builds). The batch mean, the centring and every regression
are then per run, so each run's gradients are those it would get alone; `chunk_loss` returns
the K runs' batch-mean losses, (K,), and the report's losses are (K,), as they are for one
run given `lengths`. `lengths=` (one per
example) lets the runs' sequences end at different steps in one padded batch: after an
example's end no synthetic gradient enters it, S is not fitted on it, the aux loss skips it
and centring leaves it out; `chunk_loss` must not score its padding. (S's fit still divides by
the run's B examples, the aux loss by its live steps: where a run's examples end together, as
in experiment/rnn_group.py, each equals the run's own.)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dni.interface import synthesizer_loss
from dni.synthesizers import zero_init_

State = torch.Tensor | tuple[torch.Tensor, ...]
ChunkLoss = Callable[[torch.Tensor, int, int], torch.Tensor]


def state_tensors(state: State) -> tuple[torch.Tensor, ...]:
    """The state as a tuple of tensors (an LSTM's (h, c), or one tensor alone)."""
    return tuple(state) if isinstance(state, (tuple, list)) else (state,)


def flatten_state(state: State) -> torch.Tensor:
    """One vector per example: (layers, B, H) pieces -> (B, layers * H), concatenated."""
    pieces = []
    for x in state_tensors(state):
        pieces.append(x.transpose(0, 1).reshape(x.shape[1], -1) if x.dim() == 3 else x)
    return torch.cat(pieces, dim=1)


def unflatten_state(vector: torch.Tensor, like: State) -> State:
    """Inverse of `flatten_state`: the vector cut back into tensors shaped as `like`."""
    pieces, start = [], 0
    for x in state_tensors(like):
        if x.dim() == 3:
            width = x.shape[0] * x.shape[2]
            piece = vector[:, start:start + width].reshape(x.shape[1], x.shape[0], x.shape[2])
            pieces.append(piece.transpose(0, 1).contiguous())
        else:
            width = x.shape[1]
            pieces.append(vector[:, start:start + width])
        start += width
    return tuple(pieces) if isinstance(like, (tuple, list)) else pieces[0]


def zero_state(core: nn.Module, batch: int, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> State:
    """The zero initial state of an nn.LSTM / nn.GRU / nn.RNN for `batch` examples, or of a
    custom core that defines `zero_state(batch, device, dtype)`."""
    if hasattr(core, "zero_state"):
        return core.zero_state(batch, device, dtype)
    if not isinstance(core, nn.RNNBase):
        raise TypeError("pass the initial state of a custom core (state=...), or give it a "
                        "zero_state(batch, device, dtype) method")
    if core.batch_first:
        raise ValueError("the core must take (time, batch, features): batch_first=False")
    layers = core.num_layers * (2 if core.bidirectional else 1)
    hidden = core.proj_size if getattr(core, "proj_size", 0) else core.hidden_size
    param = next(core.parameters())
    device, dtype = device or param.device, dtype or param.dtype
    h = torch.zeros(layers, batch, hidden, device=device, dtype=dtype)
    if isinstance(core, nn.LSTM):
        return h, torch.zeros(layers, batch, core.hidden_size, device=device, dtype=dtype)
    return h


def state_size(core: nn.RNNBase) -> int:
    """Width of the flattened state of an nn.LSTM / nn.GRU / nn.RNN (LSTM: h and c)."""
    return flatten_state(zero_state(core, 1)).shape[1]


class _ScaleGradient(torch.autograd.Function):
    """Identity going forward; multiplies the gradient by `scale` going backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _detached(hidden):
    """A recurrent state (a tensor, a tuple or list of them, or None), detached; a tuple
    for a tuple or list."""
    if hidden is None or isinstance(hidden, torch.Tensor):
        return None if hidden is None else hidden.detach()
    return tuple(_detached(h) for h in hidden)


def _call(synthesizer: nn.Module, state: torch.Tensor, hidden, context) -> tuple:
    """(gradient, hidden) of a synthesizer that may return a bare tensor; `context` is passed
    only when given, so a synthesizer without one need not take it."""
    out = (synthesizer(state, hidden) if context is None
           else synthesizer(state, hidden, context=context))
    return out if isinstance(out, tuple) else (out, None)


@dataclass
class SequenceReport:
    """What one call of `TruncatedBPTT` did to one batch of sequences."""

    outputs: torch.Tensor                 # readout outputs, (L, B, O), detached
    loss: torch.Tensor                    # sum of the chunk losses (the sequence's loss)
    synthesizer_loss: torch.Tensor | None = None   # mean over the fitted chunk edges
    aux_loss: torch.Tensor | None = None           # mean over chunks (DNI+Aux)
    targets: list[torch.Tensor] = field(default_factory=list)  # bootstrapped targets d_k
    state: State | None = None                     # the final state, detached
    synth_state: tuple | None = None               # a recurrent S's, for the next call


class TruncatedBPTT(nn.Module):
    """Truncated BPTT over chunks of `truncation` steps, with a synthesizer that sends the
    gradient of the future into each chunk's end and learns it from the chunk's start.

    Without a synthesizer it is plain truncated BPTT. `core` maps (input (T, B, I), state) to
    (output (T, B, H), state): nn.LSTM, nn.GRU, nn.RNN or any such module. `readout` (optional)
    maps the core's output to what `chunk_loss(y, t0, t1)` scores. `input_window=k`: S also
    gets, as its context, the last k inputs before the edge, (B, k * I) per example (zeros
    before the sequence's start, or the `history` a call is given), so its synthesizer needs
    `context_size=k * I`.
    """

    def __init__(self, core: nn.Module, truncation: int, synthesizer: nn.Module | None = None,
                 readout: nn.Module | None = None, discount: float = 1.0,
                 aux_weight: float = 0.0, aux_input_size: int | None = None,
                 batch_mean: bool = True, target_decay: float = 0.0,
                 center: bool = False, grad_scale: float | None = None, runs: int = 1,
                 input_window: int = 0):
        super().__init__()
        if grad_scale is not None:
            warnings.warn("TruncatedBPTT(grad_scale=) is now discount=", DeprecationWarning,
                          stacklevel=2)
            discount = grad_scale
        if truncation < 1:
            raise ValueError(f"truncation must be at least 1, got {truncation}")
        if runs < 1:
            raise ValueError(f"runs must be at least 1, got {runs}")
        if not discount >= 0:
            raise ValueError(f"discount must be 0 or positive, got {discount}")
        if aux_weight < 0 or (aux_weight > 0 and synthesizer is None):
            raise ValueError("aux_weight > 0 needs a synthesizer (and must not be negative)")
        if not 0.0 <= target_decay < 1.0 or (target_decay > 0 and synthesizer is None):
            raise ValueError("target_decay must be in [0, 1) and needs a synthesizer")
        if input_window < 0 or (input_window > 0 and synthesizer is None):
            raise ValueError("input_window must be 0 or positive, and > 0 needs a synthesizer")
        self.input_window = input_window
        self.core, self.readout, self.synthesizer = core, readout, synthesizer
        self.truncation, self.discount = truncation, discount
        self.aux_weight, self.batch_mean = aux_weight, batch_mean
        self.target_decay, self.center = target_decay, center
        self.runs = runs
        self.target_synthesizer = None
        if target_decay > 0:
            self.target_synthesizer = copy.deepcopy(synthesizer).requires_grad_(False)
        self.aux_head = None
        if aux_weight > 0:
            width = aux_input_size or getattr(core, "hidden_size", None)
            out = getattr(synthesizer, "output_size", None)
            if width is None or out is None:
                raise ValueError("DNI+Aux needs aux_input_size and a synthesizer with "
                                 "output_size")
            self.aux_head = zero_init_(nn.Linear(width, out))

    @property
    def grad_scale(self) -> float:
        """Deprecated name of `discount`."""
        return self.discount

    def synthetic_gradient(self, state: torch.Tensor, hidden: State | None = None,
                           live: torch.Tensor | None = None,
                           context: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, State | None]:
        """S(state.detach()): the per-example synthetic gradient (graph into S's parameters)
        and the synthesizer's new hidden state (None unless it is recurrent); `live` (1.0 /
        0.0 per example): the examples whose sequence goes on, over which it is centred;
        `context`: what S also sees (`input_window`)."""
        return self._centred(_call(self.synthesizer, state.detach(), hidden, context), live)

    def _sent_gradient(self, state: torch.Tensor, hidden=None, live=None, context=None):
        """The synthetic gradient sent into a chunk's end (detached; the target synthesizer's
        when there is one) and that synthesizer's new hidden state."""
        with torch.no_grad():
            out = _call(self.target_synthesizer, state.detach(), hidden, context)
        return self._centred(out, live)

    def _with_history(self, inputs: torch.Tensor, history: torch.Tensor | None
                      ) -> tuple[torch.Tensor, int]:
        """The inputs S's contexts are cut from: `inputs` after the last `input_window` steps
        of `history` (if any), and how many steps come before `inputs`."""
        if not self.input_window or history is None:
            return inputs, 0
        if history.dim() != 3 or history.shape[1:] != inputs.shape[1:]:
            raise ValueError(f"history must be (steps, {inputs.shape[1]}, {inputs.shape[2]}) "
                             f"like the inputs, got {tuple(history.shape)}")
        past = history[-self.input_window:]
        return torch.cat([past.to(inputs), inputs]), past.shape[0]

    def _context(self, inputs: torch.Tensor, t1: int) -> torch.Tensor | None:
        """What S sees at the edge before step t1: the `input_window` inputs before it,
        (B, window * I), zeros before the sequence (None without a window)."""
        if not self.input_window:
            return None
        seen = inputs[max(0, t1 - self.input_window):t1].detach().transpose(0, 1).flatten(1)
        width = self.input_window * inputs.shape[2]
        return seen if seen.shape[1] == width else F.pad(seen, (width - seen.shape[1], 0))

    def _centred(self, out: tuple, live: torch.Tensor | None = None) -> tuple:
        """(gradient, hidden) with the gradient minus its batch mean (each run's, over its
        `live` examples) when `center`."""
        gradient, hidden = out
        if not self.center:
            return gradient, hidden
        if self.runs == 1 and live is None:
            return gradient - gradient.mean(0, keepdim=True), hidden
        by_run = gradient.view(self.runs, -1, *gradient.shape[1:])
        if live is None:
            return (by_run - by_run.mean(1, keepdim=True)).view_as(gradient), hidden
        weight = live.view(self.runs, -1, *([1] * (gradient.dim() - 1)))
        mean = (by_run * weight).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp(min=1)
        return (by_run - mean).view_as(gradient), hidden

    def _unit(self, batch: int) -> float:
        """The examples a batch-mean loss averages over: one run's share of the batch."""
        if batch % self.runs:
            raise ValueError(f"a batch of {batch} does not split into {self.runs} runs")
        return float(batch // self.runs) if self.batch_mean else 1.0

    def _per_run(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-example values (B,) summed over each run's examples: (runs,)."""
        return rows.view(self.runs, -1).sum(1)

    def _regression(self, synthetic: torch.Tensor, target: torch.Tensor,
                    live: torch.Tensor | None) -> torch.Tensor:
        """`synthesizer_loss` of each run ((runs,); a scalar for one run without lengths),
        over the `live` examples (1.0 / 0.0 each; None: all)."""
        if self.runs == 1 and live is None:
            return synthesizer_loss(synthetic, target)
        rows = (synthetic - target).pow(2).flatten(1).sum(1)
        if live is not None:
            rows = rows * live
        return self._per_run(rows) / (rows.shape[0] // self.runs)

    def _aux_loss(self, predicted: torch.Tensor, future: torch.Tensor, t0: int,
                  lengths: torch.Tensor | None) -> torch.Tensor:
        """The aux head's regression on the future gradient sent into the chunk's end, mean
        over the chunk's steps and examples (each run's: (runs,), over its live steps)."""
        steps = predicted.shape[0]
        if self.runs == 1 and lengths is None:
            return synthesizer_loss(predicted.flatten(0, 1), future.repeat(steps, 1))
        rows = (predicted - future.unsqueeze(0)).pow(2).sum(2)          # (steps, B)
        live = torch.ones_like(rows)
        if lengths is not None:
            at = torch.arange(t0, t0 + steps, device=rows.device)[:, None]
            live = (at < lengths[None, :]).to(rows.dtype)
        return self._per_run((rows * live).sum(0)) / self._per_run(live.sum(0)).clamp(min=1)

    def _count(self, chunks: list, like: torch.Tensor) -> torch.Tensor | int:
        """How many chunks each run's mean is over: their number without lengths (None
        entries), else the chunks each run had a live example in, (runs,)."""
        if like.dim() == 0 or chunks[0] is None:
            return len(chunks)
        return torch.stack(chunks).sum(0).clamp(min=1)

    @torch.no_grad()
    def update_target(self) -> None:
        """Move the target synthesizer's parameters towards S's by (1 - target_decay)."""
        for target, online in zip(self.target_synthesizer.parameters(),
                                  self.synthesizer.parameters()):
            target.lerp_(online, 1.0 - self.target_decay)

    def future_gradients(self, inputs: torch.Tensor, chunk_loss: ChunkLoss,
                         state: State | None = None, history: torch.Tensor | None = None,
                         synth_state: tuple | None = None
                         ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(synthetic, true) gradient of the future at every inner chunk edge, both (B, state
        width) in the loss's units, by one untruncated pass that leaves every .grad as it was.

        "True" is what the synthesizer is trained towards without its own errors: the gradient
        of the losses after the edge, each further edge crossed discounting it by `discount`
        (1: the full gradient of the future). The aux loss is not in it, as it is not in the
        target. "Synthetic" is the online S's, also with a target synthesizer, from
        `synth_state` as in `forward`. A diagnostic for logged steps: the random stream
        (dropout) is forked, so training draws the same numbers with or without it.
        """
        if self.synthesizer is None:
            raise ValueError("future_gradients needs a synthesizer")
        length, batch = inputs.shape[0], inputs.shape[1]
        unit = self._unit(batch)
        if state is None:
            state = zero_state(self.core, batch, inputs.device, inputs.dtype)
        start = flatten_state(state).detach()
        edges, total = [], inputs.new_zeros(())
        devices = [inputs.device] if inputs.device.type == "cuda" else []
        # forked RNG: dropout in the core or readout leaves training's random stream as it was
        seen, shift = self._with_history(inputs, history)
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            for t0 in range(0, length, self.truncation):
                if t0 > 0:
                    edge = _ScaleGradient.apply(flatten_state(state), self.discount)
                    edges.append(edge)
                    state = unflatten_state(edge, state)
                y, state = self.core(inputs[t0:t0 + self.truncation], state)
                prediction = self.readout(y) if self.readout is not None else y
                total = total + chunk_loss(prediction, t0,
                                           min(t0 + self.truncation, length)).sum()
            true = (torch.autograd.grad(total, edges, allow_unused=True)
                    if edges and total.requires_grad else [None] * len(edges))
        pairs = []
        with torch.no_grad():
            carried = synth_state[0] if synth_state is not None else None
            _, hidden = self.synthetic_gradient(start, carried, None, self._context(seen, shift))
            for k, (edge, grad) in enumerate(zip(edges, true), start=1):
                synthetic, hidden = self.synthetic_gradient(
                    edge, hidden, None, self._context(seen, shift + k * self.truncation))
                pairs.append((synthetic / unit,
                              torch.zeros_like(edge) if grad is None else grad))
        return pairs

    def forward(self, inputs: torch.Tensor, chunk_loss: ChunkLoss,
                state: State | None = None, continues: bool = False,
                lengths: torch.Tensor | None = None,
                history: torch.Tensor | None = None,
                synth_state: tuple | None = None) -> SequenceReport:
        """Run the sequence chunk by chunk and back-propagate: the core, readout and aux head
        get their truncated (+ synthetic) gradients, the synthesizer its regression gradient.
        Step the optimizer afterwards.

        `continues=True`: the sequence goes on after `inputs` (a text stream cut into
        windows, the next call starting from `report.state`), so the last chunk's end also
        receives the synthetic gradient of the future, where by default it receives 0.

        `lengths` (B,): where each example's sequence ends in this padded batch (None: all at
        the batch's end).

        `history` (k, B, I): the inputs just before `inputs` on the same sequences (a
        stream's previous window), which the `input_window` contexts at the first edges see
        (None: zeros, as at a sequence's start; unused without an input window). On a stream,
        pass it on every call after the first, or S sees zeros there.

        `synth_state`: a recurrent synthesizer's state from the previous call on the same
        sequences (`report.synth_state`, S's before the last edge and S_bar's after it), so
        that S runs on across calls as it does across the chunk edges of one call (None: from
        zeros)."""
        length, batch = inputs.shape[0], inputs.shape[1]
        unit = self._unit(batch)
        if lengths is not None and continues:
            raise ValueError("lengths= ends sequences; continues=True says they go on")

        def going_on(t: int) -> torch.Tensor | None:
            """1.0 for the examples whose sequence has steps from t on (None: all)."""
            return None if lengths is None else (lengths > t).to(inputs.dtype)

        if lengths is not None:
            lengths = lengths.to(inputs.device)
        if state is None:
            state = zero_state(self.core, batch, inputs.device, inputs.dtype)
        start = flatten_state(state).detach()
        carried, target_hidden = synth_state if synth_state is not None else (None, None)
        synthetic, synth_hidden, carry = None, None, None
        seen, shift = self._with_history(inputs, history)      # checked before S_bar moves
        if self.target_synthesizer is not None and self.training and torch.is_grad_enabled():
            self.update_target()
        if self.synthesizer is not None:
            first = self._context(seen, shift)
            synthetic, synth_hidden = self.synthetic_gradient(start, carried, going_on(0),
                                                              first)             # S(s_0)
            if (self.target_synthesizer is not None and synth_hidden is not None
                    and synth_state is None):
                # a recurrent S_bar's state at s_0 (one without a state, as S, needs no call;
                # a carried one has seen s_0 as the previous call's last edge)
                _, target_hidden = self._sent_gradient(start, None, going_on(0), first)
        outputs, fits, targets, aux_losses = [], [], [], []
        fitted, aux_chunks = [], []           # which runs each fit / aux loss counts for
        total = inputs.new_zeros(())
        for t0 in range(0, length, self.truncation):
            t1 = min(t0 + self.truncation, length)
            live, after = going_on(t0), going_on(t1)
            running = None if live is None else (self._per_run(live) > 0).to(inputs.dtype)
            s = start.requires_grad_()
            y, end_state = self.core(inputs[t0:t1], unflatten_state(s, state))
            prediction = self.readout(y) if self.readout is not None else y
            loss_k = chunk_loss(prediction, t0, t1)
            objective = loss_k.sum() if loss_k.dim() else loss_k
            end = flatten_state(end_state)
            next_synthetic, sent, carry = None, None, synth_hidden   # S's before this edge
            if self.synthesizer is not None and (t1 < length or continues):
                context = self._context(seen, shift + t1)
                if t1 < length or self.target_synthesizer is None:
                    # S(e), to fit at the next chunk's start (unless it is the last here)
                    next_synthetic, synth_hidden = self.synthetic_gradient(
                        end, synth_hidden, after, context)
                    sent = next_synthetic.detach()
                if self.target_synthesizer is not None:
                    sent, target_hidden = self._sent_gradient(end, target_hidden, after,
                                                              context)
                if after is not None:                     # 0 after an example's end
                    sent = sent * after[:, None]
                g_end = sent * (self.discount / unit)
                objective = objective + (g_end * end).sum()   # <g_end, e>: the future
            aux_term = None
            if self.aux_head is not None:
                future = (sent if sent is not None
                          else end.new_zeros(end.shape))   # 0 after the end
                aux_k = self._aux_loss(self.aux_head(y), future, t0, lengths)
                aux_losses.append(aux_k.detach())
                aux_chunks.append(running)
                aux_term = self.aux_weight * (aux_k.sum() if aux_k.dim() else aux_k)
            if objective.requires_grad:                  # a chunk may score nothing
                objective.backward(retain_graph=aux_term is not None)
            if synthetic is not None and synthetic.requires_grad:
                # read before the aux loss's backward (which adds to s.grad): the aux loss
                # trains the core, not S's target; `* unit` makes the target a new tensor
                local = s.grad if s.grad is not None else torch.zeros_like(s)
                target = local * unit                    # bootstrapped: local + synthetic future
                targets.append(target)
                fits.append(self._regression(synthetic, target, live))
                fitted.append(running)
            if aux_term is not None and aux_term.requires_grad:
                aux_term.backward()
            outputs.append(prediction.detach())
            total = total + loss_k.detach()
            synthetic, start, state = next_synthetic, end.detach(), end_state
        fit = aux = None
        if fits:
            fit = torch.stack(fits).sum(0)
            (fit.sum() if fit.dim() else fit).backward()  # through S's own recurrence too
            fit = fit.detach() / self._count(fitted, fit)
        if aux_losses:
            aux = torch.stack(aux_losses).sum(0) / self._count(aux_chunks, aux_losses[0])
        synth_out = None
        if synth_hidden is not None:
            synth_out = (_detached(carry), _detached(target_hidden))
        return SequenceReport(torch.cat(outputs), total, fit, aux, targets, _detached(state),
                              synth_out)
