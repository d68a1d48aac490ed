"""Update-unlocked pipeline training across processes: each process runs one *stage*, a run of
consecutive blocks of an nn.Sequential, and never waits for the backward pass of the stages
above it. Communication is torch.distributed point-to-point (gloo on CPU, NCCL on GPU).

    dist.init_process_group("gloo")                   # torchrun sets rank and world size
    stage = PipelineStage(net, example_input, synthesizer="linear")
    opt = torch.optim.Adam(stage.param_groups(lr=1e-3, synthesizer_lr=1e-2))
    for x, y in batches:                               # every rank runs the same loop;
        loss = stage.train_step(opt, x, y)            # x, y are read by stage 0 only

For mini-batch t, stage s does:

    h_in, y = receive from stage s-1               stage 0: the batch itself
    h = blocks(h_in)                               interfaces between its own blocks as usual
    send (h, y) to stage s+1                       the last stage: loss(h, y).backward()
    h.backward(scale * S(h, c) / B)                synthetic gradient: all gradients are ready
    send d = h_in.grad to stage s-1                the target of stage s-1's synthesizer
    grad of ||S(h, c) - B d||^2 on batch t - k     d came back from stage s+1 meanwhile
    optimizer.step()                               update-unlocked: nobody above is awaited

k is the staleness. With k = 0 a stage waits for batch t's own target before its next batch,
and the parameters follow one-process `DNI` exactly (the same arithmetic per parameter). With
k >= 1 the stages work on different mini-batches at the same moment. The synthesizer is run
again on the kept activation when its target arrives, so its gradient is taken at its current
parameters (a gradient through the old prediction's graph would be a delayed gradient, which
at the synthesizers' high learning rates diverges). Targets travel in the loss's units; the
synthesizer predicts B times them, as in `dni.interface`.

Messages have a fixed size (the largest batch), so the next one is always being received
while the current one is used; a smaller batch travels padded. Labels travel with the
activation in its dtype (class indices are exact). A neighbour that dies or stays silent for
`timeout` seconds raises `PipelineError` instead of hanging.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from time import perf_counter

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dni.interface import Interface, synthesizer_loss
from dni.synthesizers import one_hot
from dni.wrapper import SynthesizerFactory, eval_mode, synthesizer_factory

TRAIN, EVAL, STOP = 1.0, 2.0, 3.0    # forward message kinds
FORWARD_TAG, BACKWARD_TAG = 11, 12


class PipelineError(RuntimeError):
    """A neighbouring stage died, stayed silent past the timeout, or fell out of step."""


@dataclass
class StageTimes:
    """Where a stage's time goes, in seconds: `total` inside train steps, of which `wait`
    blocked on a neighbour and `comm` packing and posting messages; the rest is compute."""

    total: float = 0.0
    wait: float = 0.0
    comm: float = 0.0

    @property
    def compute(self) -> float:
        """Seconds of the stage's own arithmetic and Python."""
        return self.total - self.wait - self.comm


def block_costs(blocks: Sequence[nn.Module], example_input: torch.Tensor,
                factory: SynthesizerFactory | None = None, context_size: int = 0) -> list[float]:
    """Floating-point operations of one forward and backward of each block (with its
    synthesizer, when `factory` is given, for every block but the last) on `example_input`'s
    batch, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    costs, h = [], example_input
    # a forked random stream: counting must not change the weights built after it
    with torch.random.fork_rng(devices=[]), ExitStack() as modes:
        try:
            for i, block in enumerate(blocks):
                modes.enter_context(eval_mode(block))
                with FlopCounterMode(display=False) as counter:
                    x = h.detach().requires_grad_(i > 0)
                    out = block(x)
                    out.backward(torch.ones_like(out))
                    if factory is not None and i < len(blocks) - 1:
                        synthesizer = factory(tuple(out.shape[1:]), context_size).to(
                            device=out.device, dtype=out.dtype)
                        context = (out.new_zeros(len(out), context_size) if context_size
                                   else None)
                        g = synthesizer(out.detach(), None, context=context)[0]
                        g.sum().backward()
                costs.append(float(counter.get_total_flops()))
                h = out.detach()
        finally:
            for block in blocks:
                block.zero_grad(set_to_none=True)
    return costs


def measured_block_costs(blocks: Sequence[nn.Module], example_input: torch.Tensor,
                         factory: SynthesizerFactory | None = None, context_size: int = 0,
                         batch: int | None = None, repeats: int = 15) -> list[float]:
    """Seconds of one training step of each block on this machine, as a stage runs it: the
    forward, its synthesizer's prediction and fit (every block but the last), the backward and
    an Adam step, on copies, so the blocks are untouched. The blocks take turns, one step each
    per round, so drift in the machine's speed reaches all of them alike; each cost is the
    median of `repeats` rounds. Unlike counted operations it includes the per-operation
    overhead that dominates small layers on a CPU; measure with the thread count the stages
    will use. `batch`: rows per step (default: the example's, repeated as needed)."""
    import copy
    import statistics

    rows = batch or len(example_input)
    h = example_input[torch.arange(rows, device=example_input.device) % len(example_input)]
    steps = []
    with torch.random.fork_rng(devices=[]):
        for i, original in enumerate(blocks):
            block = copy.deepcopy(original)
            params = list(block.parameters())
            synthesizer = None
            with torch.no_grad():
                out = block(h)
            if factory is not None and i < len(blocks) - 1:
                synthesizer = factory(tuple(out.shape[1:]), context_size).to(
                    device=out.device, dtype=out.dtype)
                params += list(synthesizer.parameters())
            context = out.new_zeros(len(out), context_size) if context_size else None
            optimizer = torch.optim.Adam(params, lr=1e-6) if params else None
            x = h.detach().requires_grad_(i > 0)
            steps.append(_block_step(block, synthesizer, optimizer, x, context))
            h = out.detach()
        times: list[list[float]] = [[] for _ in blocks]
        for r in range(repeats + 2):                  # the first two rounds warm up
            for i, step in enumerate(steps):
                elapsed = step()
                if r >= 2:
                    times[i].append(elapsed)
    return [statistics.median(t) for t in times]


def _block_step(block: nn.Module, synthesizer: nn.Module | None,
                optimizer: torch.optim.Optimizer | None, x: torch.Tensor,
                context: torch.Tensor | None) -> Callable[[], float]:
    """A function that runs one timed training step of `block` and returns its seconds."""
    cuda = x.device.type == "cuda"

    def step() -> float:
        if cuda:
            torch.cuda.synchronize(x.device)
        start = perf_counter()
        y = block(x)
        if y.requires_grad:
            if synthesizer is not None:
                g = synthesizer(y.detach(), None, context=context)[0]
                y.backward(g.detach())
                synthesizer_loss(synthesizer(y.detach(), None, context=context)[0],
                                 torch.zeros_like(g)).backward()
            else:
                y.backward(torch.ones_like(y))
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(x.device)
        return perf_counter() - start

    return step


def balanced_stages(costs: Sequence[float], num_stages: int) -> list[int]:
    """Block counts of `num_stages` contiguous stages that minimise the largest stage cost."""
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot split {n} blocks into {num_stages} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[k][j]: the smallest possible largest cost of the first j blocks in k stages
    best = [[math.inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    counts, j = [], n
    for k in range(num_stages, 0, -1):
        counts.append(j - cut[k][j])
        j = cut[k][j]
    return counts[::-1]


class _Link:
    """Fixed-size messages to or from one neighbour. Sends are non-blocking from a ring of two
    buffers; a receive is always posted ahead, so the next message travels while the current
    one is in use (a received buffer stays valid until the next receive returns)."""

    def __init__(self, peer: int, numel: int, dtype: torch.dtype, device: torch.device,
                 tag: int, timeout: float, times: StageTimes, receiving: bool):
        self.peer, self.tag, self.times = peer, tag, times
        self.timeout = timedelta(seconds=timeout)
        self.buffers = [torch.zeros(numel, dtype=dtype, device=device) for _ in range(2)]
        self.works: list = [None, None]
        self.index = 0
        if receiving:
            self.works[0] = dist.irecv(self.buffers[0], peer, tag=tag)

    def _wait(self, work) -> None:
        start = perf_counter()
        try:
            work.wait(self.timeout)
        except RuntimeError as exc:
            text = str(exc)
            if "closed" in text.lower() or "reset" in text.lower():
                reason = "its connection closed (the process died or stopped)"
            elif "timed out" in text.lower() or "timeout" in text.lower():
                reason = f"no message for {self.timeout.total_seconds():.0f}s"
            else:
                reason = text.splitlines()[0][:160]
            raise PipelineError(f"stage {self.peer} is not answering: {reason}") from None
        finally:
            self.times.wait += perf_counter() - start

    def send(self, parts: Sequence[torch.Tensor]) -> None:
        """Pack `parts` (flattened, in order) into a free buffer and post its send."""
        buffer, work = self.buffers[self.index], self.works[self.index]
        if work is not None:
            self._wait(work)
        start = perf_counter()
        offset = 0
        for part in parts:
            n = part.numel()
            buffer[offset:offset + n].copy_(part.reshape(-1))
            offset += n
        self.works[self.index] = dist.isend(buffer, self.peer, tag=self.tag)
        self.index ^= 1
        self.times.comm += perf_counter() - start

    def receive(self) -> torch.Tensor:
        """The next message (a buffer of the link's size); the one after is posted now."""
        buffer = self.buffers[self.index]
        self._wait(self.works[self.index])
        self.index ^= 1
        start = perf_counter()
        self.works[self.index] = dist.irecv(self.buffers[self.index], self.peer, tag=self.tag)
        self.times.comm += perf_counter() - start
        return buffer

    def flush(self) -> None:
        """Wait until every posted send has left."""
        for i, work in enumerate(self.works):
            if work is not None:
                self._wait(work)
                self.works[i] = None


@dataclass
class _Pending:
    """A mini-batch whose synthesizer update waits for its target from the next stage."""

    step: int
    h: torch.Tensor                      # the stage's output activation (detached)
    context: torch.Tensor | None
    target: torch.Tensor | None = None   # d, in the loss's units, once it has arrived


class PipelineStage(nn.Module):
    """One process's share of a pipeline trained with synthetic gradients: its blocks, the
    interfaces between them, and the synthesizer at its output edge.

    Usage: `stage = PipelineStage(net, x[:2], synthesizer="linear")` on every rank after
    `dist.init_process_group`; `counts=[1, 3]` fixes the blocks per stage (default: balanced
    by counted floating-point operations; `balanced_stages(measured_block_costs(...), N)`
    balances by measured time instead: measure once, with the stages' thread count, and give
    every rank the same counts). `context_size` > 0 makes it cDNI (labels become
    one-hot contexts); `staleness` is how many mini-batches a synthesizer update may lag;
    `max_batch` is the largest batch it will see (default: the example's); targets are class
    indices unless `integer_targets=False`.
    """

    def __init__(self, net: nn.Sequential, example_input: torch.Tensor,
                 synthesizer: str | SynthesizerFactory = "linear",
                 counts: Sequence[int] | None = None, context_size: int = 0,
                 grad_scale: float = 1.0, staleness: int = 1, timeout: float = 30.0,
                 loss_fn: Callable = F.cross_entropy, integer_targets: bool = True,
                 max_batch: int | None = None,
                 rank: int | None = None, world_size: int | None = None,
                 **synthesizer_options):
        super().__init__()
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        blocks = list(net.children())
        factory = (synthesizer_factory(synthesizer, **synthesizer_options)
                   if isinstance(synthesizer, str) else synthesizer)
        if counts is None:
            counts = balanced_stages(block_costs(blocks, example_input, factory, context_size),
                                     self.world_size)
        self.counts = check_counts(counts, len(blocks), self.world_size)
        if staleness < 0:
            raise ValueError(f"staleness must be 0 or more, got {staleness}")
        self.context_size, self.grad_scale, self.staleness = context_size, grad_scale, staleness
        self.loss_fn, self.integer_targets = loss_fn, integer_targets
        first = sum(self.counts[:self.rank])
        self.block_range = (first, first + self.counts[self.rank])
        shapes = _output_shapes(net, example_input)
        # every rank builds every synthesizer in the same order, as one-process DNI does, so
        # the random streams (and hence initial weights) agree with it
        synthesizers = [factory(shapes[i], context_size) for i in range(len(blocks) - 1)]
        mine = range(*self.block_range)
        self.blocks = nn.ModuleList(blocks[i] for i in mine)
        self.interfaces = nn.ModuleList(Interface(synthesizers[i], grad_scale)
                                        for i in mine if i < len(blocks) - 1)
        self.is_first, self.is_last = self.rank == 0, self.rank == self.world_size - 1
        self.input_shape = tuple(example_input.shape[1:]) if self.is_first else shapes[first - 1]
        self.output_shape = shapes[self.block_range[1] - 1]
        dtype, device = example_input.dtype, example_input.device
        param = next(net.parameters(), None)
        if param is not None:
            dtype, device = param.dtype, param.device
        self.interfaces.to(device=device, dtype=dtype)
        self.max_batch = max_batch or len(example_input)
        self.header = 4 + len(blocks)   # kind, step, batch, signal, one loss per interface
        self.times = StageTimes()
        self.step = 0
        self.stopped: int | None = None          # the signal that stopped the pipeline
        self._stop_request = 0                   # a signal seen here or reported from above
        self._upstream_losses: list[float] = []  # synthesizer losses of the stages below
        self._pending: deque[_Pending] = deque()
        # the edge synthesizer's last (S, B d), or its loss once restored from a checkpoint
        self._edge_fit: tuple[torch.Tensor, torch.Tensor] | float | None = None
        forward_size = [self.header + self.max_batch * (1 + math.prod(shape))
                        for shape in (self.input_shape, self.output_shape)]
        backward_size = [2 + self.max_batch * math.prod(shape)
                         for shape in (self.input_shape, self.output_shape)]
        self._previous = self._feedback = self._next = self._targets = None
        link = {"dtype": dtype, "device": device, "timeout": timeout, "times": self.times}
        if not self.is_first:
            self._previous = _Link(self.rank - 1, forward_size[0], tag=FORWARD_TAG,
                                   receiving=True, **link)
            self._feedback = _Link(self.rank - 1, backward_size[0], tag=BACKWARD_TAG,
                                   receiving=False, **link)
        if not self.is_last:
            self._next = _Link(self.rank + 1, forward_size[1], tag=FORWARD_TAG,
                               receiving=False, **link)
            self._targets = _Link(self.rank + 1, backward_size[1], tag=BACKWARD_TAG,
                                  receiving=True, **link)

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

    # -- training -------------------------------------------------------------------------
    def request_stop(self, signum: int) -> None:
        """Ask the pipeline to stop after the mini-batch in progress (e.g. on SIGINT): stage 0
        stops feeding it, every stage learns it from the messages."""
        self._stop_request = self._stop_request or int(signum)

    def _context(self, labels: torch.Tensor) -> torch.Tensor | None:
        return one_hot(labels.long(), self.context_size) if self.context_size else None

    def _receive_input(self, kind: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(h_in, labels) of the next message of `kind` from stage s-1; None after STOP."""
        message = self._previous.receive()
        got, step, n, signal = message[:4].tolist()
        if got == STOP:
            self.stopped = int(signal)
            return None
        if got != kind or (kind == TRAIN and int(step) != self.step):
            raise PipelineError(f"stage {self.rank - 1} is out of step (sent kind {got:g} "
                                f"step {step:g}, expected kind {kind:g} step {self.step})")
        n = int(n)
        below = self.block_range[0]  # interfaces under this stage, one loss slot each
        self._upstream_losses = message[4:4 + below].tolist()
        labels = message[self.header:self.header + n]
        if self.integer_targets:
            labels = labels.long()
        start = self.header + self.max_batch
        h = message[start:start + n * math.prod(self.input_shape)]
        return h.view(n, *self.input_shape), labels

    def _send_output(self, kind: float, h: torch.Tensor, labels: torch.Tensor,
                     report: bool = False) -> None:
        """Send (h, labels) to stage s+1; with `report`, the synthesizer losses of this stage
        and the ones below ride in the header (nan otherwise)."""
        header = torch.full((self.header,), math.nan, dtype=h.dtype)
        header[:4] = torch.tensor([kind, self.step, len(h), 0.0])
        if report:
            losses = self._upstream_losses + self.synthesizer_losses()
            header[4:4 + len(losses)] = torch.tensor(losses)
        parts = [header.to(h.device), labels.to(h.dtype)]
        if len(h) < self.max_batch:
            parts.append(h.new_zeros(self.max_batch - len(h)))
        parts.append(h.detach())  # rows past the batch keep old values; the receiver skips them
        self._next.send(parts)

    def _send_stop(self) -> None:
        """Pass the stop on to stage s+1 in place of a mini-batch."""
        buffer = self._next.buffers[0]
        header = torch.zeros(self.header, dtype=buffer.dtype)
        header[:4] = torch.tensor([STOP, self.step, 0.0, float(self.stopped)])
        self._next.send([header.to(buffer.device)])

    def train_step(self, optimizer: torch.optim.Optimizer, x: torch.Tensor | None = None,
                   y: torch.Tensor | None = None, report: bool = False) -> float | None:
        """One mini-batch through this stage (x, y are read at stage 0 only). Returns the loss
        at the last stage, else None. Afterwards `stopped` holds the signal if the pipeline
        was asked to stop (this mini-batch was then not trained). `report`: carry every
        synthesizer loss up to the last stage (`upstream_synthesizer_losses()` there)."""
        start = perf_counter()
        try:
            return self._train_step(optimizer, x, y, report)
        finally:
            self.times.total += perf_counter() - start

    def _train_step(self, optimizer, x, y, report) -> float | None:
        if self.is_first:
            if self._stop_request:
                self.stopped = self._stop_request
            h_in, labels = x, y
        else:
            received = self._receive_input(TRAIN)
            h_in, labels = received if received is not None else (None, None)
        if self.stopped is not None:
            if not self.is_last:
                self._send_stop()
            return None
        if not self.is_first:
            h_in = h_in.detach().requires_grad_()
        context = self._context(labels)
        optimizer.zero_grad(set_to_none=True)
        h = h_in
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i < len(self.blocks) - 1:
                h = self.interfaces[i](h, context)
        loss = None
        if self.is_last:
            loss = self.loss_fn(h, labels)
            loss.backward()
        else:
            self._send_output(TRAIN, h, labels, report)
            edge = self.interfaces[-1]
            with torch.no_grad():
                edge.send_gradient(h, edge.predict(h, context))
        if not self.is_first:
            # h_in's gradient came through a scaled synthetic gradient unless the loss is
            # right above it; the target goes back in the loss's units
            delivered = 1.0 if self.is_last and len(self.blocks) == 1 else self.grad_scale
            grad = h_in.grad if delivered == 1.0 else h_in.grad / delivered
            flags = torch.tensor([float(self.step), float(self._stop_request)], dtype=grad.dtype)
            self._feedback.send([flags.to(grad.device), grad])
        if not self.is_last:
            self._pending.append(_Pending(self.step, h.detach(), context))
            while len(self._pending) > self.staleness:
                self.fit_synthesizer()
        optimizer.step()  # blocks on batch t, the edge synthesizer on batch t - k: one step
        self.step += 1
        return None if loss is None else loss.item()

    def _receive_target(self, entry: _Pending) -> None:
        """Wait for the target of `entry` from stage s+1."""
        message = self._targets.receive()
        step, signal = (int(v) for v in message[:2].tolist())
        if step != entry.step:
            raise PipelineError(f"stage {self.rank + 1} is out of step (target for step {step}, "
                                f"expected {entry.step})")
        if signal:
            self.request_stop(signal)
        entry.target = message[2:2 + entry.h.numel()].view_as(entry.h).clone()

    def fit_synthesizer(self) -> None:
        """Add the edge synthesizer's regression gradient on the oldest pending mini-batch
        (waiting for its target if it is still travelling); the next optimizer step applies
        it."""
        entry = self._pending.popleft()
        if entry.target is None:
            self._receive_target(entry)
        edge = self.interfaces[-1]
        target = entry.target * edge.unit(entry.h)   # per-example units, as S predicts
        synthetic = edge.predict(entry.h, entry.context)
        synthesizer_loss(synthetic, target).backward()
        self._edge_fit = (synthetic.detach(), target)

    @property
    def pending(self) -> int:
        """Mini-batches whose synthesizer update still waits."""
        return len(self._pending)

    def synthesizer_losses(self) -> list[float]:
        """This stage's synthesizer regression losses on their last training step, inner
        interfaces first, then the output edge (nan before the first)."""
        inner = [math.nan if i.last_loss is None else i.last_loss.item()
                 for i in list(self.interfaces)[:len(self.blocks) - 1]]
        if self.is_last:
            return inner
        return inner + [self._edge_loss()]

    def _edge_loss(self) -> float:
        """The edge synthesizer's loss on its last update (nan before the first)."""
        if isinstance(self._edge_fit, tuple):
            return synthesizer_loss(*self._edge_fit).item()
        return math.nan if self._edge_fit is None else self._edge_fit

    def upstream_synthesizer_losses(self) -> list[float]:
        """The synthesizer losses of the stages below, as the last message carried them."""
        return list(self._upstream_losses)

    def collect_targets(self) -> None:
        """Receive every target still travelling, so the pending updates (and this stage's
        state) are complete; used before a checkpoint."""
        for entry in self._pending:
            if entry.target is None:
                self._receive_target(entry)

    def flush(self) -> None:
        """Wait until every message this stage sent has left."""
        for link in (self._next, self._feedback):
            if link is not None:
                link.flush()

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def eval_step(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One evaluation batch through this stage's blocks (in their current mode). The last
        stage returns (network output, labels); the others None."""
        if self.is_first:
            h, labels = x, y
        else:
            received = self._receive_input(EVAL)
            if received is None:
                raise PipelineError("the pipeline stopped during evaluation")
            h, labels = received
        for block in self.blocks:
            h = block(h)
        if self.is_last:
            return h, labels
        self._send_output(EVAL, h, labels)
        return None

    # -- state ----------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        """The step and the pending synthesizer updates (call `collect_targets` first)."""
        if any(e.target is None for e in self._pending):
            raise RuntimeError("collect_targets() before saving a pipeline stage")
        return {"step": self.step, "edge_loss": self._edge_loss(), "pending": [
            {"step": e.step, "h": e.h, "context": e.context, "target": e.target}
            for e in self._pending]}

    def set_extra_state(self, state: dict) -> None:
        """Restore the step and the pending synthesizer updates."""
        self.step = int(state["step"])
        self._edge_fit = None if math.isnan(state["edge_loss"]) else state["edge_loss"]
        self._pending = deque(_Pending(e["step"], e["h"], e["context"], e["target"])
                              for e in state["pending"])


def check_counts(counts: Sequence[int], num_blocks: int, num_stages: int) -> list[int]:
    """Validate blocks-per-stage counts: one positive count per stage, summing to the blocks."""
    counts = list(counts)
    if len(counts) != num_stages:
        raise ValueError(f"{len(counts)} stage sizes given for {num_stages} processes")
    if any(c < 1 for c in counts) or sum(counts) != num_blocks:
        raise ValueError(f"stage sizes {counts} must be positive and sum to the network's "
                         f"{num_blocks} blocks")
    return counts


def _output_shapes(net: nn.Sequential, example_input: torch.Tensor) -> list[tuple]:
    """Each child's output shape (without the batch dimension), from one eval-mode pass."""
    shapes, h = [], example_input
    with eval_mode(net), torch.no_grad():
        for block in net.children():
            h = block(h)
            shapes.append(tuple(h.shape[1:]))
    return shapes
