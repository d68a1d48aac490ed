"""One process's share of a pipeline trained with synthetic gradients (`PipelineStage`)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from time import perf_counter

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dni.interface import Interface, synthesizer_loss
from dni.pipeline import INTERFACE_MODES
from dni.pipeline.split import (
    check_counts,
    counted_split,
    interface_positions,
    output_shapes,
)
from dni.pipeline.transport import Layout, PipelineError, Receiver, Sender, StageTimes
from dni.synthesizers import one_hot
from dni.wrapper import SynthesizerFactory, synthesizer_factory

TRAIN, EVAL, STOP = 1.0, 2.0, 3.0    # forward message kinds
FORWARD_TAG, BACKWARD_TAG, TRUE_GRADIENT_TAG = 11, 12, 13
# kind, step, batch rows, stop signal, whether a context rides along (else it is rebuilt from
# the labels); then one loss, then one cosine, per interface
HEADER = 5


@dataclass
class StepFigures:
    """Every interface's synthesizer loss and cosine to the true gradient (nan where not
    measured) on one training step, in interface order over the whole network."""

    step: int
    losses: list[float]
    cosines: list[float]


@dataclass
class _Pending:
    """A mini-batch whose synthesizer update waits for its target from the next stage."""

    step: int
    h: torch.Tensor                      # the stage's output activation (detached)
    context: torch.Tensor | None
    target: torch.Tensor | None = None   # d, in the loss's units, once it has arrived


@contextmanager
def running_statistics_kept(module: nn.Module) -> Iterator[None]:
    """Run the body with `module`'s buffers (BatchNorm's running statistics) restored after:
    a second forward pass on the same batch must not count it twice."""
    buffers = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


def link_groups(world_size: int) -> dict[tuple[int, int], dist.ProcessGroup]:
    """A process group of its own for each link (by its lower stage) and kind of message (by
    its tag), made in the same order on every rank (new_group is a collective)."""
    return {(lower, tag): dist.new_group([lower, lower + 1])
            for lower in range(world_size - 1)
            for tag in (FORWARD_TAG, BACKWARD_TAG, TRUE_GRADIENT_TAG)}


class PipelineStage(nn.Module):
    """One process's share of a pipeline trained with synthetic gradients: a run of
    consecutive blocks of an nn.Sequential and the synthesizer at its output edge.

    Usage: `stage = PipelineStage(net, x[:2])` on every rank after `dist.init_process_group`.
    `interfaces="edges"` (default): the stage backprops through its own blocks from one
    synthetic gradient at its output; `"all"`: an interface after every block, as
    one-process `DNI`. `counts=[1, 3]` fixes the blocks per stage (default: balanced by
    counted operations, synthesizers included; give every rank the same counts).
    `context_size` > 0 makes it cDNI (labels become one-hot contexts); `staleness` is how many
    mini-batches a synthesizer update may lag; `max_batch` is the largest batch it will see
    (default: the example's); `message_dtype` (e.g. torch.bfloat16) is the dtype activations
    and gradients travel in (default: the network's); targets are class indices unless
    `integer_targets=False`. `center_gradients` subtracts the batch mean from the synthetic
    gradients of every interface but the top one, as one-process `DNI` does. `batch_mean=False`
    for a `loss_fn` summed (not averaged) over the batch, as in `DNI`. `label_shape`: one
    example's target shape (a language model's: (T,), one target per position; cDNI's context
    is then one per position, rebuilt from the labels at each stage rather than sent).
    `frozen_stages=k`: the first k stages never train (no synthesizer at their edges, no
    gradient sent down to them): the control that shows what the synthetic gradients taught.

    After building, every rank reseeds torch's random stream from one number drawn from the
    stream (the same on every rank) plus its rank, so stages draw their own dropout masks,
    reproducibly; build the network and the stage with the same seed on every rank, so the
    initial weights agree.
    """

    def __init__(self, net: nn.Sequential, example_input: torch.Tensor,
                 synthesizer: str | SynthesizerFactory = "linear",
                 counts: Sequence[int] | None = None, interfaces: str = "edges",
                 context_size: int = 0, grad_scale: float = 1.0, staleness: int = 1,
                 timeout: float = 30.0, loss_fn: Callable = F.cross_entropy,
                 integer_targets: bool = True, max_batch: int | None = None,
                 message_dtype: torch.dtype | None = None,
                 rank: int | None = None, world_size: int | None = None,
                 center_gradients: bool = True, batch_mean: bool = True,
                 label_shape: Sequence[int] = (), frozen_stages: int = 0,
                 **synthesizer_options):
        super().__init__()
        if interfaces not in INTERFACE_MODES:
            raise ValueError(f"interfaces must be one of {INTERFACE_MODES}, got {interfaces!r}")
        if staleness < 0:
            raise ValueError(f"staleness must be 0 or more, got {staleness}")
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        blocks = list(net.children())
        factory = (synthesizer_factory(synthesizer, **synthesizer_options)
                   if isinstance(synthesizer, str) else synthesizer)
        if counts is None:
            counts = counted_split(blocks, example_input, self.world_size, factory,
                                   context_size, interfaces)
        self.counts = check_counts(counts, len(blocks), self.world_size)
        self.interface_mode = interfaces
        self.context_size, self.grad_scale, self.staleness = context_size, grad_scale, staleness
        self.loss_fn, self.integer_targets = loss_fn, integer_targets
        first = sum(self.counts[:self.rank])
        self.block_range = (first, first + self.counts[self.rank])
        if not 0 <= frozen_stages < self.world_size:
            raise ValueError(f"frozen_stages must be 0 to {self.world_size - 1}, "
                             f"got {frozen_stages}")
        self.frozen_stages, self.label_shape = frozen_stages, tuple(label_shape)
        self.frozen = self.rank < frozen_stages
        trained_from = sum(self.counts[:frozen_stages])   # the first block that trains
        self.positions = [i for i in interface_positions(self.counts, interfaces)  # whole net
                          if i >= trained_from]
        shapes = output_shapes(net, example_input)
        # every rank builds every synthesizer in the same order, as one-process DNI does, so
        # the random streams (and hence initial weights) agree with it
        synthesizers = {i: factory(shapes[i], context_size) for i in self.positions}
        mine = [i for i in self.positions if first <= i < self.block_range[1]]
        self.blocks = nn.ModuleList(blocks[i] for i in range(*self.block_range))
        # this stage's interfaces in block order: the inner ones, then the edge (if not last)
        top = max(self.positions, default=None)  # the one interface fit on the true gradient
        self.interfaces = nn.ModuleList(
            Interface(synthesizers[i], grad_scale, batch_mean=batch_mean,
                      center=center_gradients and i != top)
            for i in mine)
        self.is_first, self.is_last = self.rank == 0, self.rank == self.world_size - 1
        self.sends_down = self.rank > frozen_stages   # the stage below learns from us
        if self.frozen:
            for p in self.blocks.parameters():
                p.requires_grad_(False)
        self._inner = {i - first: self.interfaces[n] for n, i in enumerate(mine)
                       if i < self.block_range[1] - 1}
        self.edge = None if self.is_last or self.frozen else self.interfaces[-1]
        self.input_shape = tuple(example_input.shape[1:]) if self.is_first else shapes[first - 1]
        self.output_shape = shapes[self.block_range[1] - 1]
        dtype, device = example_input.dtype, example_input.device
        param = next(net.parameters(), None)
        if param is not None:
            dtype, device = param.dtype, param.device
        self.interfaces.to(device=device, dtype=dtype)
        self.device = device
        self.dtype, self.message_dtype = dtype, message_dtype or dtype
        self.max_batch = max_batch or len(example_input)
        self.times = StageTimes()
        self.step = 0
        self.stopped: int | None = None          # the signal that stopped the pipeline
        self._stop_request = 0                   # a signal seen here or reported from above
        self._below = sum(1 for i in self.positions if i < first)  # interfaces under this stage
        self._own = len(mine)                    # interfaces this stage runs
        # the figures of the stages below on their step before the last message's, and this
        # stage's own on its last step: a message of step t carries everyone's of step t - 1
        # (a step's fit comes after its message has left)
        self._upstream = StepFigures(-1, [math.nan] * self._below, [math.nan] * self._below)
        self._own_figures = StepFigures(-1, [math.nan] * self._own, [math.nan] * self._own)
        self._complete: StepFigures | None = None   # last stage: every stage's, whole
        self._reported_through = -1              # last stage: the last step handed out
        self.last_measure_seconds = 0.0          # the last step's time spent measuring
        self._pending: deque[_Pending] = deque()
        # the edge synthesizer's (S, B d) of the fit in this step (None: no fit yet)
        self._edge_fit: tuple[torch.Tensor, torch.Tensor] | None = None
        # messages live where the backend carries them: on the GPU for NCCL, else in host
        # memory (gloo; a CUDA stage's messages are then staged through the host)
        self.link_device = (device if device.type == "cuda" and dist.get_backend() == "nccl"
                            else torch.device("cpu"))
        self._build_links(self.link_device, timeout)
        # a stream of the stage's own: with the shared seed alone, stages whose blocks end in
        # same-shaped dropout would draw the same masks at every step
        shared = int(torch.randint(2**62, (1,)).item())
        torch.manual_seed(shared + self.rank)

    def _build_links(self, device: torch.device, timeout: float) -> None:
        """The message layouts and the links to both neighbours. Each receiver keeps
        staleness + 2 receives posted: a lower stage may run `staleness` mini-batches ahead
        of its targets, and no sender ever waits for a receive not yet posted.

        Every kind of message on every link has a process group of its own (activations up,
        targets down, true gradients down), so within one group a rank only sends or only
        receives, and messages match in the order they were posted. That is what makes the
        posted-ahead receives safe under NCCL, which runs a communicator's operations in
        order on one stream and ignores tags: with one group, a receive posted ahead would
        sit in front of the same rank's next send to that peer, each side's stream would
        wait on the other's, and a true gradient could land in a buffer meant for a target.
        Under gloo the tags alone would do; the groups are the same there."""
        groups = link_groups(self.world_size)
        label_dtype = torch.int64 if self.integer_targets else self.dtype
        wire = self.message_dtype

        def forward(shape):
            return Layout([("header", torch.float64, HEADER + 2 * len(self.positions)),
                           ("labels", label_dtype,
                            self.max_batch * math.prod(self.label_shape)),
                           ("context", self.dtype, self.max_batch * self.context_size),
                           ("h", wire, self.max_batch * math.prod(shape))])

        def backward(shape):
            return Layout([("header", torch.float64, 2),
                           ("grad", wire, self.max_batch * math.prod(shape))])

        self._in_layout, self._out_layout = forward(self.input_shape), forward(self.output_shape)
        self._feedback_layout = backward(self.input_shape)
        self._target_layout = backward(self.output_shape)
        link = {"device": device, "timeout": timeout, "times": self.times}
        ahead = self.staleness + 2
        self._previous = self._feedback = self._next = self._targets = None
        self._true_below = self._true_above = None   # true gradients, on measured steps only
        below, above = self.rank - 1, self.rank   # the links, by their lower stage
        if not self.is_first:
            self._previous = Receiver(below, self._in_layout.nbytes, FORWARD_TAG, ahead=ahead,
                                      group=groups[below, FORWARD_TAG], **link)
        if self.sends_down:
            self._feedback = Sender(below, self._feedback_layout.nbytes, BACKWARD_TAG,
                                    group=groups[below, BACKWARD_TAG], **link)
            self._true_below = Sender(below, self._feedback_layout.nbytes, TRUE_GRADIENT_TAG,
                                      group=groups[below, TRUE_GRADIENT_TAG], **link)
        if not self.is_last:
            self._next = Sender(above + 1, self._out_layout.nbytes, FORWARD_TAG,
                                group=groups[above, FORWARD_TAG], **link)
        if self.edge is not None:
            self._targets = Receiver(above + 1, self._target_layout.nbytes, BACKWARD_TAG,
                                     ahead=ahead, group=groups[above, BACKWARD_TAG], **link)
            self._true_above = Receiver(above + 1, self._target_layout.nbytes,
                                        TRUE_GRADIENT_TAG, ahead=1,
                                        group=groups[above, TRUE_GRADIENT_TAG], **link)

    # -- parameters -----------------------------------------------------------------------
    def block_parameters(self):
        """This stage's block parameters."""
        return self.blocks.parameters()

    def synthesizer_parameters(self):
        """This stage's synthesizer parameters (inner interfaces and the output edge)."""
        return self.interfaces.parameters()

    def param_groups(self, lr: float, synthesizer_lr: float | None = None) -> list[dict]:
        """Optimizer parameter groups: the blocks at `lr`, the synthesizers at
        `synthesizer_lr` (default `lr`), as one-process `DNI` arranges them."""
        groups = [{"params": list(self.block_parameters()), "lr": lr}]
        synth = list(self.synthesizer_parameters())
        if synth:
            groups.append({"params": synth, "lr": synthesizer_lr or lr})
        return groups

    # -- messages -------------------------------------------------------------------------
    def request_stop(self, signum: int) -> None:
        """Ask the pipeline to stop after the mini-batch in progress (e.g. on SIGINT): stage 0
        stops feeding it, every stage learns it from the messages."""
        self._stop_request = self._stop_request or int(signum)

    @property
    def stop_requested(self) -> int:
        """The signal this stage was asked to stop by (here or from a neighbour), 0 if none."""
        return self._stop_request

    def _context(self, values: torch.Tensor, from_labels: bool = False
                 ) -> torch.Tensor | None:
        """The synthesizers' context: integer labels become one-hot vectors, float contexts
        (batch, context_size) pass through, as in `DNI`. Built `from_labels`, it is one per
        target (batch, *label_shape, context_size)."""
        if not self.context_size:
            return None
        context = one_hot(values, self.context_size)
        want = ((len(values), *self.label_shape) if from_labels else (len(values),))
        if context.shape != (*want, self.context_size):
            raise ValueError(f"a context must be labels or (batch, {self.context_size}) "
                             f"vectors, got shape {tuple(values.shape)}")
        return context.to(self.dtype)

    def _read_figures(self, header: torch.Tensor) -> None:
        """Keep the figures of the stages below that a message's header carries (of the step
        before the message's)."""
        count, below = len(self.positions), self._below
        step = int(header[1].item()) - 1
        self._upstream = StepFigures(step, header[HEADER:HEADER + below].tolist(),
                                     header[HEADER + count:HEADER + count + below].tolist())

    def _write_figures(self, header: torch.Tensor) -> None:
        """Put the figures of this stage and the ones below, of the step before this
        message's, into an outgoing header (the rest stays nan)."""
        count, through = len(self.positions), self._below + self._own
        losses = self._upstream.losses + self._own_figures.losses
        cosines = self._upstream.cosines + self._own_figures.cosines
        header[HEADER:HEADER + through] = torch.tensor(losses, dtype=torch.float64)
        header[HEADER + count:HEADER + count + through] = torch.tensor(cosines,
                                                                       dtype=torch.float64)

    def _complete_figures(self) -> None:
        """Last stage: every stage's figures of the step before the one in progress."""
        self._complete = StepFigures(self.step - 1,
                                     self._upstream.losses + self._own_figures.losses,
                                     self._upstream.cosines + self._own_figures.cosines)

    def _receive_input(self, kind: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(h_in, labels, context) of the next message of `kind` from stage s-1; None after
        STOP."""
        layout = self._in_layout
        message = self._previous.receive()
        header = layout.field(message, "header")
        got, step, n, signal, context_sent = header[:HEADER].tolist()
        if got == STOP:
            self._read_figures(header)
            self.stopped = int(signal)
            return None
        if got != kind or (kind == TRAIN and int(step) != self.step):
            raise PipelineError(f"stage {self.rank - 1} is out of step (sent kind {got:g} "
                                f"step {step:g}, expected kind {kind:g} step {self.step})")
        n = int(n)
        self._read_figures(header)
        labels = layout.field(message, "labels")[:n * math.prod(self.label_shape)].view(
            n, *self.label_shape).to(self.device)
        context = None
        if self.context_size and kind == TRAIN and not self.frozen:
            if context_sent:   # kept with a pending update: a copy, not the buffer
                context = layout.field(message, "context")[:n * self.context_size].view(
                    n, self.context_size).to(self.device, copy=True)
            else:
                context = self._context(labels, from_labels=True)
        h = layout.field(message, "h")[:n * math.prod(self.input_shape)]
        return h.view(n, *self.input_shape).to(self.device, self.dtype), labels, context

    def _send_output(self, kind: float, h: torch.Tensor, labels: torch.Tensor,
                     context: torch.Tensor | None = None) -> None:
        """Send (h, labels, context) to stage s+1, with the figures of this stage and the
        ones below of the step before (context None: stage s+1 rebuilds it from the
        labels, if it uses one)."""
        layout = self._out_layout

        def fill(buffer):
            header = layout.field(buffer, "header")
            header.fill_(math.nan)
            header[:HEADER] = torch.tensor([kind, self.step, len(h), 0.0,
                                            float(context is not None)], dtype=torch.float64)
            self._write_figures(header)
            layout.field(buffer, "labels")[:labels.numel()].copy_(labels.reshape(-1))
            if context is not None:
                layout.field(buffer, "context")[:context.numel()].copy_(context.reshape(-1))
            # rows past the batch keep old values; the receiver skips them
            layout.field(buffer, "h")[:h.numel()].copy_(h.detach().reshape(-1))

        self._next.send(fill)

    def _send_stop(self) -> None:
        """Pass the stop on to stage s+1 in place of a mini-batch, with the last step's
        figures."""
        def fill(buffer):
            header = self._out_layout.field(buffer, "header")
            header.fill_(math.nan)
            header[:HEADER] = torch.tensor([STOP, self.step, 0.0, float(self.stopped), 0.0],
                                           dtype=torch.float64)
            self._write_figures(header)

        self._next.send(fill)

    def _send_gradient(self, link: Sender, grad: torch.Tensor) -> None:
        """Send a gradient at this stage's input (in the loss's units) down to stage s-1,
        with the step and any stop request."""
        layout = self._feedback_layout

        def fill(buffer):
            layout.field(buffer, "header")[:] = torch.tensor(
                [float(self.step), float(self._stop_request)], dtype=torch.float64)
            layout.field(buffer, "grad")[:grad.numel()].copy_(grad.reshape(-1))

        link.send(fill)

    def _send_input_gradient(self, grad: torch.Tensor) -> None:
        """Send d = dL/dh_in (in the loss's units) down to stage s-1, with the step and any
        stop request."""
        self._send_gradient(self._feedback, grad)

    def _receive_gradient(self, link: Receiver, step: int, like: torch.Tensor) -> torch.Tensor:
        """The next gradient at this stage's output from stage s+1, which must be of `step`;
        a stop request riding with it is taken up."""
        layout = self._target_layout
        message = link.receive()
        got, signal = (int(v) for v in layout.field(message, "header").tolist())
        if got != step:
            raise PipelineError(f"stage {self.rank + 1} is out of step (gradient for step "
                                f"{got}, expected {step})")
        if signal:
            self.request_stop(signal)
        grad = layout.field(message, "grad")[:like.numel()]
        return grad.view(like.shape).to(self.device, self.dtype, copy=True)

    def _receive_target(self, entry: _Pending) -> None:
        """Wait for the target of `entry` from stage s+1."""
        entry.target = self._receive_gradient(self._targets, entry.step, entry.h)

    # -- training -------------------------------------------------------------------------
    def train_step(self, optimizer: torch.optim.Optimizer, x: torch.Tensor | None = None,
                   y: torch.Tensor | None = None, report: bool = False, *,
                   context: torch.Tensor | None = None, measure: bool = False
                   ) -> float | None:
        """One mini-batch through this stage (x, y and context are read at stage 0 only).
        Returns the loss at the last stage, else None. Afterwards `stopped` holds the signal
        if the pipeline was asked to stop (this mini-batch was then not trained).
        `context` (cDNI): integer labels or (batch, context_size) vectors (default: y).
        `report`: carry this step's synthesizer losses up to the last stage, and `measure`
        each interface's cosine to the true gradient (every rank must pass the same
        `measure` on a step: the true gradients come down the pipeline, which waits for them);
        the next message carries them (`reported_figures()` at the last stage)."""
        start = perf_counter()
        self.last_measure_seconds = 0.0
        try:
            return self._train_step(optimizer, x, y, context, report, measure)
        finally:
            self.times.total += perf_counter() - start - self.last_measure_seconds

    def _train_step(self, optimizer, x, y, context, report, measure) -> float | None:
        sent = None   # a context given at stage 0 travels; one from the labels is rebuilt
        if self.is_first:
            if self._stop_request:
                self.stopped = self._stop_request
            h_in, labels = x, y
            if self.stopped is None and not self.frozen:
                given = context is not None
                context = self._context(context if given else y, from_labels=not given)
                sent = context if given else None
        else:
            received = self._receive_input(TRAIN)
            h_in, labels, context = received if received is not None else (None, None, None)
        if self.is_last:
            self._complete_figures()
        if self.stopped is not None:
            if not self.is_last:
                self._send_stop()
            return None
        if self.frozen:
            return self._forward_only(h_in, labels)
        if self.sends_down:
            h_in = h_in.detach().requires_grad_()
        streams = self._random_states() if measure else None
        self._edge_fit = None
        optimizer.zero_grad(set_to_none=True)
        h = h_in
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in self._inner:
                h = self._inner[i](h, context)
        loss = None
        if self.is_last:
            loss = self.loss_fn(h, labels)
            loss.backward()
        else:
            self._send_output(TRAIN, h, labels, sent)
            with torch.no_grad():
                self.edge.send_gradient(h, self.edge.predict(h, context))
        if self.sends_down:
            # h_in's gradient came through a scaled synthetic gradient unless the loss is
            # right above it; the target goes back in the loss's units
            delivered = 1.0 if self.is_last and not self._inner else self.grad_scale
            self._send_input_gradient(h_in.grad if delivered == 1.0 else h_in.grad / delivered)
        if not self.is_last:
            kept = h.detach()
            if not self.is_first and kept.untyped_storage().data_ptr() == \
                    h_in.untyped_storage().data_ptr():
                kept = kept.clone()   # blocks that return a view of a receive buffer
            self._pending.append(_Pending(self.step, kept, context))
            while len(self._pending) > self.staleness:
                self.fit_synthesizer()
        cosines = [math.nan] * self._own
        if measure:   # before the step: the graph it builds holds this step's parameters
            cosines = self._measure(h_in, labels, context, streams)
        optimizer.step()  # blocks on batch t, the edge synthesizer on batch t - k: one step
        losses = self.synthesizer_losses() if report else [math.nan] * self._own
        self._own_figures = StepFigures(self.step, losses, cosines)
        self.step += 1
        return None if loss is None else loss.item()

    def _forward_only(self, h_in: torch.Tensor, labels: torch.Tensor) -> None:
        """A frozen stage's step: its blocks forward, the output sent up; nothing learns."""
        with torch.no_grad():
            h = h_in
            for block in self.blocks:
                h = block(h)
        self._send_output(TRAIN, h, labels)
        self._own_figures = StepFigures(self.step, [], [])
        self.step += 1

    def _random_states(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The random streams as they are now (CPU, and the stage's GPU if it has one)."""
        cuda = (torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
                else None)
        return torch.get_rng_state(), cuda

    def _measure(self, h_in: torch.Tensor, labels: torch.Tensor,
                 context: torch.Tensor | None,
                 streams: tuple[torch.Tensor, torch.Tensor | None]) -> list[float]:
        """Each of this stage's interfaces' cosine between its synthetic gradient and the
        true one (whole batch as one vector), as one-process `DNI.gradient_cosines` measures
        it: the stage's blocks run again on the same input with the same dropout masks and no
        interfaces, the true gradient at the output comes from stage s+1 (the loss at the
        last stage), and the one at the input goes down to stage s-1. Training's random
        streams, gradients and running statistics are left as they were."""
        start = perf_counter()
        cpu, cuda = streams
        devices = [self.device] if self.device.type == "cuda" else []
        with self.times.excluded(), running_statistics_kept(self), \
                torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self.device)
            x = h_in.detach().requires_grad_(self.sends_down)
            h, inner = x, []
            for i, block in enumerate(self.blocks):
                h = block(h)
                if i in self._inner:
                    inner.append((self._inner[i], h))
            if self.is_last:
                root, from_above = self.loss_fn(h, labels), None
            else:
                root, from_above = h, self._receive_gradient(self._true_above, self.step, h)
            wanted = [out for _, out in inner] + ([x] if self.sends_down else [])
            grads = [None] * len(wanted)
            if wanted and root.requires_grad:
                grads = list(torch.autograd.grad(root, wanted, from_above, allow_unused=True))
            grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wanted, grads)]
            if self.sends_down:
                self._send_gradient(self._true_below, grads.pop())
            pairs = list(zip(inner, grads))
            if not self.is_last:
                pairs.append(((self.edge, h), from_above))
            with torch.no_grad():
                cosines = [F.cosine_similarity(
                    (interface.predict(out, context) / interface.unit(out)).flatten(),
                    true.flatten(), dim=0).item() for (interface, out), true in pairs]
        self.last_measure_seconds = perf_counter() - start
        return cosines

    def fit_synthesizer(self) -> int:
        """Add the edge synthesizer's regression gradient on the oldest pending mini-batch
        (waiting for its target if it is still travelling); the next optimizer step applies
        it. Returns the step that mini-batch was trained at."""
        entry = self._pending.popleft()
        if entry.target is None:
            self._receive_target(entry)
        target = entry.target * self.edge.unit(entry.h)   # per-example units, as S predicts
        # S runs again at its current parameters: a gradient through the old prediction
        # would be a delayed one, which at synthesizer learning rates diverges
        with running_statistics_kept(self.edge.synthesizer):   # restored after backward,
            synthetic = self.edge.predict(entry.h, entry.context)  # which reads them
            synthesizer_loss(synthetic, target).backward()
        self._edge_fit = (synthetic.detach(), target)
        return entry.step

    def drain(self, optimizer: torch.optim.Optimizer) -> int:
        """After the last train_step: apply every synthesizer update still pending, one
        optimizer step each at the optimizer's current learning rates (only the edge
        synthesizer has gradients then). Returns how many."""
        done = 0
        with self.times.excluded():
            self.collect_targets()
            while self._pending:
                optimizer.zero_grad(set_to_none=True)
                self.fit_synthesizer()
                optimizer.step()
                done += 1
        return done

    @property
    def pending(self) -> int:
        """Mini-batches whose synthesizer update still waits."""
        return len(self._pending)

    def synthesizer_losses(self) -> list[float]:
        """This stage's synthesizer regression losses on their last training step, inner
        interfaces first, then the output edge (nan where it had none: before the first,
        and on the first `staleness` steps at the edge)."""
        inner = [math.nan if i.last_loss is None else i.last_loss.item()
                 for i in self._inner.values()]
        if self.is_last:
            return inner
        return inner + [self._edge_loss()]

    def _edge_loss(self) -> float:
        """The edge synthesizer's loss on its last fit (nan before the first)."""
        return math.nan if self._edge_fit is None else synthesizer_loss(*self._edge_fit).item()

    def reported_figures(self) -> StepFigures | None:
        """Last stage: every interface's synthesizer loss (with `report`) and cosine (with
        `measure`) on the step before the last message (training, evaluation or stop) came
        in, once each; None if that step's figures were handed out already. A step's fit
        comes after its message has left, so its figures travel with the next one."""
        figures = self._complete
        if not self.is_last or figures is None or figures.step <= self._reported_through:
            return None
        self._reported_through = figures.step
        return figures

    def collect_targets(self) -> None:
        """Receive every target still travelling, so the pending updates (and this stage's
        state) are complete; used before a checkpoint."""
        with self.times.excluded():
            for entry in self._pending:
                if entry.target is None:
                    self._receive_target(entry)

    def flush(self) -> None:
        """Wait until every message this stage sent has left."""
        with self.times.excluded():
            for link in (self._next, self._feedback, self._true_below):
                if link is not None:
                    link.flush()

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def eval_step(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One evaluation batch through this stage's blocks (in their current mode). The last
        stage returns (network output, labels); the others None."""
        with self.times.excluded():
            return self._eval_step(x, y)

    def _eval_step(self, x, y):
        if self.is_first:
            h, labels = x, y
        else:
            received = self._receive_input(EVAL)
            if received is None:
                raise PipelineError("the pipeline stopped during evaluation")
            h, labels, _ = received
        if self.is_last:
            self._complete_figures()
        for block in self.blocks:
            h = block(h)
        if self.is_last:
            return h, labels.clone()
        self._send_output(EVAL, h, labels)
        return None

    # -- state ----------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        """The step and the pending synthesizer updates (call `collect_targets` first)."""
        if any(e.target is None for e in self._pending):
            raise RuntimeError("collect_targets() before saving a pipeline stage")
        return {"step": self.step, "pending": [
            {"step": e.step, "h": e.h, "context": e.context, "target": e.target}
            for e in self._pending]}

    def set_extra_state(self, state: dict) -> None:
        """Restore the step and the pending synthesizer updates. The figures of the steps
        before it count as handed out (a checkpoint is written after they were)."""
        self.step = int(state["step"])
        self._reported_through = self.step - 1
        self._pending = deque(_Pending(e["step"], e["h"], e["context"], e["target"])
                              for e in state["pending"])
