"""Where to cut a network into pipeline stages: each block's counted cost, the cost of a
synthesizer at its output, and the contiguous split that makes the slowest stage fastest."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import ExitStack

import torch
from torch import nn

from dni.pipeline import INTERFACE_MODES
from dni.wrapper import SynthesizerFactory, eval_mode


def block_costs(blocks: Sequence[nn.Module], example_input: torch.Tensor) -> list[float]:
    """Floating-point operations of one forward and backward of each block on
    `example_input`'s batch (the first block computes no input gradient), counted by torch's
    FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    costs, h = [], example_input
    # a forked random stream: counting (dropout, say) must not change what is built after it
    with torch.random.fork_rng(devices=[]), ExitStack() as modes:
        try:
            for i, block in enumerate(blocks):
                modes.enter_context(eval_mode(block))
                with FlopCounterMode(display=False) as counter:
                    x = h.detach().requires_grad_(i > 0)
                    out = block(x)
                    out.backward(torch.ones_like(out))
                costs.append(float(counter.get_total_flops()))
                h = out.detach()
        finally:
            for block in blocks:
                block.zero_grad(set_to_none=True)
    return costs


def synthesizer_costs(blocks: Sequence[nn.Module], example_input: torch.Tensor,
                      factory: SynthesizerFactory, context_size: int = 0) -> list[float]:
    """Floating-point operations of a synthesizer after each block but the last, per step:
    its prediction, and its fit (prediction again and backward), counted by FlopCounterMode
    on throwaway synthesizers (the random stream is left as it was)."""
    from torch.utils.flop_counter import FlopCounterMode

    costs = []
    with torch.random.fork_rng(devices=[]):
        for shape in output_shapes(nn.Sequential(*blocks), example_input)[:-1]:
            synthesizer = factory(shape, context_size).to(example_input.device)
            h = torch.zeros(len(example_input), *shape, device=example_input.device)
            context = h.new_zeros(len(h), context_size) if context_size else None
            with FlopCounterMode(display=False) as counter:
                with torch.no_grad():
                    synthesizer(h, None, context=context)
                synthesizer(h, None, context=context)[0].sum().backward()
            costs.append(float(counter.get_total_flops()))
    return costs


def stage_costs(counts: Sequence[int], costs: Sequence[float],
                synth_costs: Sequence[float] | None = None, interfaces: str = "edges"
                ) -> list[float]:
    """Each stage's cost under a split: its blocks, plus the synthesizers it runs (edges:
    one at its output, except the last stage; all: one after each block but the network's
    last)."""
    totals, first = [], 0
    for count in counts:
        last = first + count
        total = sum(costs[first:last])
        if synth_costs is not None:
            ends = range(first, min(last, len(costs) - 1)) if interfaces == "all" else (
                [last - 1] if last < len(costs) else [])
            total += sum(synth_costs[i] for i in ends)
        totals.append(total)
        first = last
    return totals


def balanced_stages(costs: Sequence[float], num_stages: int,
                    edge_costs: Sequence[float] | None = None) -> list[int]:
    """Block counts of `num_stages` contiguous stages that minimise the largest stage cost.
    `edge_costs[i]`: what a stage pays on top when it ends at block i (its edge synthesizer;
    nothing for the network's last block)."""
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot split {n} blocks into {num_stages} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(i: int, j: int) -> float:  # blocks i .. j-1 as one stage
        edge = edge_costs[j - 1] if edge_costs is not None and j < n else 0.0
        return prefix[j] - prefix[i] + edge

    # best[k][j]: the smallest possible largest cost of the first j blocks in k stages
    best = [[math.inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], cost(i, j))
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    counts, j = [], n
    for k in range(num_stages, 0, -1):
        counts.append(j - cut[k][j])
        j = cut[k][j]
    return counts[::-1]


def counted_split(blocks: Sequence[nn.Module], example_input: torch.Tensor, num_stages: int,
                  factory: SynthesizerFactory, context_size: int = 0,
                  interfaces: str = "edges") -> list[int]:
    """The split balanced by counted operations, blocks and synthesizers as `interfaces`
    places them."""
    costs = block_costs(blocks, example_input)
    synth = synthesizer_costs(blocks, example_input, factory, context_size)
    if interfaces == "all":   # a synthesizer after every block, wherever the cuts fall
        return balanced_stages([c + (synth[i] if i < len(synth) else 0.0)
                                for i, c in enumerate(costs)], num_stages)
    return balanced_stages(costs, num_stages, edge_costs=synth)


def check_counts(counts: Sequence[int], num_blocks: int, num_stages: int) -> list[int]:
    """Validate blocks-per-stage counts: one positive count per stage, summing to the blocks."""
    counts = list(counts)
    if len(counts) != num_stages:
        raise ValueError(f"{len(counts)} stage sizes given for {num_stages} processes")
    if any(c < 1 for c in counts) or sum(counts) != num_blocks:
        raise ValueError(f"stage sizes {counts} must be positive and sum to the network's "
                         f"{num_blocks} blocks")
    return counts


def interface_positions(counts: Sequence[int], interfaces: str = "edges") -> list[int]:
    """The blocks an interface follows: the last block of every stage but the last (edges),
    or every block but the network's last (all)."""
    if interfaces not in INTERFACE_MODES:
        raise ValueError(f"interfaces must be one of {INTERFACE_MODES}, got {interfaces!r}")
    if interfaces == "all":
        return list(range(sum(counts) - 1))
    ends = [sum(counts[:s + 1]) - 1 for s in range(len(counts))]
    return ends[:-1]


def output_shapes(net: nn.Sequential, example_input: torch.Tensor) -> list[tuple]:
    """Each child's output shape (without the batch dimension), from one eval-mode pass."""
    shapes, h = [], example_input
    with eval_mode(net), torch.no_grad():
        for block in net.children():
            h = block(h)
            shapes.append(tuple(h.shape[1:]))
    return shapes
