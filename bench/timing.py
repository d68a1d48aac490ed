"""Measured step times for the pipeline benchmarks: each block's training step, and each
synthesizer's, on this machine, on copies (the network is left untouched). Unlike counted
operations (`dni.pipeline.block_costs`) they include the per-operation overhead that
dominates small layers on a CPU. Measure with the thread count the stages will use."""

from __future__ import annotations

import copy
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from time import perf_counter

import torch
from torch import nn

from dni.interface import synthesizer_loss
from dni.wrapper import SynthesizerFactory
from experiment.train import adam  # the stages' optimizer


def _timed(step: Callable[[], None], device: torch.device) -> Callable[[], float]:
    """`step` as a function that returns its seconds (synchronising a GPU around it)."""
    cuda = device.type == "cuda"

    def run() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        return perf_counter() - start

    return run


def _block_step(block: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One backprop training step of `block` on x (input gradient too when x requires it)."""
    params = list(block.parameters())
    optimizer = adam(params, lr=1e-6) if params else None

    def step() -> None:
        y = block(x)
        if y.requires_grad:
            y.backward(torch.ones_like(y))
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def _synthesizer_step(synthesizer: nn.Module, h: torch.Tensor,
                      context: torch.Tensor | None) -> Callable[[], None]:
    """One step of a synthesizer as a pipeline stage runs it: the prediction it sends, the
    prediction again at fit time, the fit's backward and an Adam step."""
    optimizer = adam(synthesizer.parameters(), lr=1e-6)
    target = torch.zeros_like(h)

    def step() -> None:
        with torch.no_grad():
            synthesizer(h, None, context=context)
        synthesizer_loss(synthesizer(h, None, context=context)[0], target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measured_costs(blocks: Sequence[nn.Module], example_input: torch.Tensor,
                   factory: SynthesizerFactory, context_size: int = 0,
                   batch: int | None = None, repeats: int = 15
                   ) -> tuple[list[float], list[float]]:
    """(seconds of one training step of each block, seconds of one step of a synthesizer
    after each block but the last), on copies. The steps take turns, one each per round, so
    drift in the machine's speed reaches all alike; each is the median of `repeats` rounds.
    `batch`: rows per step (default: the example's, repeated as needed)."""
    rows = batch or len(example_input)
    h = example_input[torch.arange(rows, device=example_input.device) % len(example_input)]
    block_steps, synth_steps = [], []
    with torch.random.fork_rng(devices=[]):
        for i, original in enumerate(blocks):
            block = copy.deepcopy(original)
            with torch.no_grad():
                out = block(h)
            block_steps.append(_timed(_block_step(block, h.detach().requires_grad_(i > 0)),
                                      h.device))
            if i < len(blocks) - 1:
                synthesizer = factory(tuple(out.shape[1:]), context_size).to(
                    device=out.device, dtype=out.dtype)
                context = out.new_zeros(len(out), context_size) if context_size else None
                synth_steps.append(_timed(_synthesizer_step(synthesizer, out, context),
                                          out.device))
            h = out.detach()
        steps = block_steps + synth_steps
        times: list[list[float]] = [[] for _ in steps]
        for r in range(repeats + 2):                  # the first two rounds warm up
            for i, step in enumerate(steps):
                elapsed = step()
                if r >= 2:
                    times[i].append(elapsed)
    medians = [statistics.median(t) for t in times]
    return medians[:len(blocks)], medians[len(blocks):]


@contextmanager
def one_pinned_thread() -> Iterator[None]:
    """Run the body on one torch thread pinned to one core (as each stage runs); restore both."""
    threads = torch.get_num_threads()
    pinned = os.sched_getaffinity(0) if hasattr(os, "sched_setaffinity") else None
    try:
        torch.set_num_threads(1)
        if pinned:
            os.sched_setaffinity(0, {min(pinned)})
        yield
    finally:
        torch.set_num_threads(threads)
        if pinned:
            os.sched_setaffinity(0, pinned)
