"""PyTorch's synchronous pipeline schedules (torch.distributed.pipelining) on any nn.Sequential
cut into stages: what bench/parallel.py (an MLP) and bench/gpt.py (a GPT) run as their GPipe,
1F1B and zero-bubble rows. Each rank calls `schedule_step` under an initialised process group."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B",
             "zero-bubble": "ScheduleInterleavedZeroBubble"}


def virtual_stages(num_blocks: int, world: int) -> list[list[int]]:
    """Contiguous groups of blocks, a multiple of `world` of them (interleaved schedules give
    every rank the same number of virtual stages): one block each where the count allows,
    the last blocks merged otherwise."""
    groups = max(num_blocks // world, 1) * world
    sizes = [1] * groups
    sizes[-1] += num_blocks - groups
    starts = [sum(sizes[:i]) for i in range(groups)]
    return [list(range(start, start + size)) for start, size in zip(starts, sizes)]


def rank_blocks(kind: str, counts: list[int], rank: int, world: int) -> list[int]:
    """The blocks rank `rank` trains under schedule `kind`: its contiguous share of `counts`
    (blocks per stage), or under zero-bubble (interleaved) virtual stages rank, rank + world,
    ... of `virtual_stages`."""
    if kind == "zero-bubble":
        stages = virtual_stages(sum(counts), world)
        return [block for group in stages[rank::world] for block in group]
    first = sum(counts[:rank])
    return list(range(first, first + counts[rank]))


def schedule_step(kind: str, net: nn.Sequential, counts: list[int], rank: int, world: int,
                  microbatches: int, example_input: torch.Tensor,
                  loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  device: torch.device
                  ) -> tuple[Callable[[torch.Tensor, torch.Tensor], None], list[nn.Parameter]]:
    """This rank's part of `net` (its children the blocks) under schedule `kind`, with
    `counts` blocks per stage: returns (step(x, y), the parameters this rank trains). step runs
    one batch's forward and backward in `microbatches` microbatches (the gradient that of the
    batch's mean loss); x matters on the rank of the first block, y on that of the last.
    `example_input`: one microbatch of the first block's input, for the stages' shapes."""
    from torch.distributed import pipelining

    blocks = list(net.children())
    schedule_class = getattr(pipelining, SCHEDULES[kind])
    # each block's input for one microbatch, given to the stages so they do not infer shapes
    # with a forward pass of their own (which ran BatchNorm on empty tensors)
    shapes = [example_input]
    was_training = net.training
    with torch.no_grad():
        net.eval()
        for block in blocks:
            shapes.append(block(shapes[-1]))
        net.train(was_training)
    mine = rank_blocks(kind, counts, rank, world)
    if kind == "zero-bubble":  # interleaved: several virtual stages per rank
        groups = virtual_stages(len(blocks), world)
        stages = [pipelining.PipelineStage(nn.Sequential(*(blocks[i] for i in groups[v])), v,
                                           len(groups), device, input_args=shapes[groups[v][0]])
                  for v in range(rank, len(groups), world)]
        schedule = schedule_class(stages, microbatches, loss_fn=loss_fn)
        params = [p for i in mine for p in blocks[i].parameters()]
        first, last = 0 in mine, len(blocks) - 1 in mine
    else:
        part = nn.Sequential(*(blocks[i] for i in mine))
        stage = pipelining.PipelineStage(part, rank, world, device, input_args=shapes[mine[0]])
        schedule = schedule_class(stage, microbatches, loss_fn=loss_fn)
        params = list(part.parameters())
        first, last = rank == 0, rank == world - 1

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        kwargs = {"target": y, "losses": []} if last else {}
        if first:
            schedule.step(x, **kwargs)
        else:
            schedule.step(**kwargs)

    return step, params


def end_worker() -> None:
    """End a worker process once every rank is done. Not through destroy_process_group or the
    interpreter's exit: after a pipelining schedule, gloo's threads sometimes abort the
    process as they are torn down ("terminate called without an active exception"), a third
    of the runs here, after all the work is written."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
