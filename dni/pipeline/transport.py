"""How pipeline stages talk: fixed-size byte messages with named fields, sent and received
ahead of use over torch.distributed point-to-point (gloo on CPU, NCCL on GPU), with a timeout
that turns a dead or silent neighbour into a `PipelineError`, and the time it all takes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from time import perf_counter

import torch
import torch.distributed as dist

ALIGN = 8  # bytes: every field starts where any dtype may be viewed


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

    @contextmanager
    def excluded(self) -> Iterator[None]:
        """Waiting and messages in the body (evaluation, say) are not train-step time."""
        wait, comm = self.wait, self.comm
        try:
            yield
        finally:
            self.wait, self.comm = wait, comm


class Layout:
    """Where each named field of a fixed-size message lies in its byte buffer.

    Usage: `layout = Layout([("header", torch.float64, 4), ("h", torch.bfloat16, 1024)])`,
    then `layout.field(buffer, "h")[:n].copy_(h.flatten())` to write (casting to the field's
    dtype) and `layout.field(buffer, "h")[:n]` to read. Fields keep their own dtype, so step
    counts and labels stay exact when activations travel in a narrower one."""

    def __init__(self, fields: Sequence[tuple[str, torch.dtype, int]]):
        self.fields: dict[str, tuple[int, int, torch.dtype]] = {}  # name: offset, bytes, dtype
        offset = 0
        for name, dtype, numel in fields:
            size = numel * torch.empty((), dtype=dtype).element_size()
            self.fields[name] = (offset, size, dtype)
            offset += -(-size // ALIGN) * ALIGN
        self.nbytes = offset

    def field(self, buffer: torch.Tensor, name: str) -> torch.Tensor:
        """The field `name` of a message buffer, as a 1-D view in the field's dtype."""
        offset, size, dtype = self.fields[name]
        return buffer[offset:offset + size].view(dtype)


def _peer_error(exc: RuntimeError, peer: int, timeout: timedelta) -> PipelineError:
    """The PipelineError naming the peer for what torch.distributed raised on a link."""
    text = str(exc)
    if "closed" in text.lower() or "reset" in text.lower():
        reason = "its connection closed (the process died or stopped)"
    elif "timed out" in text.lower() or "timeout" in text.lower():
        reason = f"no message for {timeout.total_seconds():.0f}s"
    else:
        reason = text.splitlines()[0][:160]
    return PipelineError(f"stage {peer} is not answering: {reason}")


def _wait(work, peer: int, timeout: timedelta, times: StageTimes) -> None:
    """Wait for one posted send or receive; a closed connection or the timeout raises
    PipelineError naming the peer. The time counts as waiting."""
    start = perf_counter()
    try:
        work.wait(timeout)
    except RuntimeError as exc:
        raise _peer_error(exc, peer, timeout) from None
    finally:
        times.wait += perf_counter() - start


class Sender:
    """Messages of `nbytes` to one neighbour, posted without blocking from a ring of `slots`
    buffers (a buffer is reused once its previous message has left)."""

    def __init__(self, peer: int, nbytes: int, tag: int, device: torch.device,
                 timeout: float, times: StageTimes, slots: int = 2, group=None):
        self.peer, self.tag, self.times, self.group = peer, tag, times, group
        self.timeout = timedelta(seconds=timeout)
        self.buffers = [torch.zeros(nbytes, dtype=torch.uint8, device=device)
                        for _ in range(slots)]
        self.works: list = [None] * slots
        self.index = 0

    def send(self, fill: Callable[[torch.Tensor], None]) -> None:
        """Take the next free buffer, let `fill(buffer)` write the message, post its send."""
        buffer, work = self.buffers[self.index], self.works[self.index]
        if work is not None:
            _wait(work, self.peer, self.timeout, self.times)
        start = perf_counter()
        fill(buffer)
        try:   # posting to a peer already gone may fail at once
            self.works[self.index] = dist.isend(buffer, self.peer, group=self.group,
                                                tag=self.tag)
        except RuntimeError as exc:
            raise _peer_error(exc, self.peer, self.timeout) from None
        self.index = (self.index + 1) % len(self.buffers)
        self.times.comm += perf_counter() - start

    def flush(self) -> None:
        """Wait until every posted message has left."""
        for i, work in enumerate(self.works):
            if work is not None:
                _wait(work, self.peer, self.timeout, self.times)
                self.works[i] = None


class Receiver:
    """Messages of `nbytes` from one neighbour, with `ahead` receives always posted, so up to
    that many messages can arrive before they are used (a sender never waits for a receive
    that is not posted yet). The buffer `receive` returns stays valid until the next call."""

    def __init__(self, peer: int, nbytes: int, tag: int, device: torch.device,
                 timeout: float, times: StageTimes, ahead: int = 1, group=None):
        if ahead < 1:
            raise ValueError(f"ahead must be 1 or more, got {ahead}")
        self.peer, self.tag, self.times, self.group = peer, tag, times, group
        self.timeout = timedelta(seconds=timeout)
        self.buffers = [torch.zeros(nbytes, dtype=torch.uint8, device=device)
                        for _ in range(ahead + 1)]
        self.works: list = [None] * len(self.buffers)
        self.received = 0   # messages returned so far
        for i in range(ahead):
            self._post(i)

    def _post(self, index: int) -> None:
        # a peer that sent its last message and left refuses the post at once; the error
        # waits in the slot until that message is wanted, so the messages it did send arrive
        try:
            self.works[index] = dist.irecv(self.buffers[index], self.peer, group=self.group,
                                           tag=self.tag)
        except RuntimeError as exc:
            self.works[index] = _peer_error(exc, self.peer, self.timeout)

    def receive(self) -> torch.Tensor:
        """The next message (a buffer of the link's size)."""
        slots = len(self.buffers)
        index = self.received % slots
        # the buffer returned last time (at first, the spare one) is free again: the receive
        # posted into it is for the message `ahead` after this one (gloo matches in order)
        start = perf_counter()
        self._post((index - 1) % slots)
        self.times.comm += perf_counter() - start
        if isinstance(self.works[index], PipelineError):
            raise self.works[index]
        _wait(self.works[index], self.peer, self.timeout, self.times)
        self.works[index] = None
        self.received += 1
        return self.buffers[index]
