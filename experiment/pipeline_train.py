"""main.py under torchrun: the MNIST network as a pipeline of `dni.pipeline.PipelineStage`s,
one per process. Every rank runs the same loop; stage 0 draws the mini-batches, the last
stage computes the loss and keeps the run records (metrics.csv, summary.json, the epoch
lines). Each stage writes its own checkpoint, and `--resume` restarts them together."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from dni.pipeline import PipelineError, PipelineStage
from experiment.data import MNIST, batch_order, batches, num_batches
from experiment.errors import USER_ERROR_EXIT, RunInterrupted, UserError
from experiment.records import MetricsLog, save_checkpoint
from experiment.train import (
    LoopState,
    _StopRequest,
    adam,
    cosine_schedule,
    finish_epoch,
    restore_training,
    score,
    write_summary,
)

MESSAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""--message-dtype: the dtype activations and gradients travel in between stages."""


def world_size_from_env() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def pin_to_cores() -> list[int] | None:
    """Give this local rank its own share of the CPU cores it may use (torchrun's LOCAL_RANK of
    LOCAL_WORLD_SIZE), so stages do not migrate between cores; return them (None: not pinned,
    where the platform cannot pin or there are fewer cores than local ranks)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        return None
    share = len(cores) // ranks
    mine = cores[local * share:(local + 1) * share]
    os.sched_setaffinity(0, mine)
    return mine


def start_process_group(device: torch.device, timeout: float) -> None:
    """Join the process group torchrun describes: gloo on CPU (each rank pinned to its own
    cores), NCCL on CUDA."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cpu":
        pin_to_cores()
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", "1")):
            raise UserError("NCCL needs one GPU per stage on a machine; run with --device cpu")
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))


def shared_out_dir(out: str | None) -> str:
    """The run folder every rank agrees on: rank 0's choice (its default name has a time)."""
    chosen = [out or f"runs/main-{time.strftime('%Y%m%d-%H%M%S')}"]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def stage_checkpoint_name(rank: int) -> str:
    """File name of one stage's checkpoint in the run folder."""
    return f"checkpoint-stage{rank}.pt"


def evaluate_pipeline(stage: PipelineStage, data: MNIST, batch_size: int
                      ) -> tuple[float, float] | None:
    """Test loss and accuracy through the pipeline (every rank calls it; the last stage
    returns the figures, the others None)."""
    stage.eval()
    results = (stage.eval_step(x, y) if stage.is_first else stage.eval_step()
               for x, y in batches(data.test_x, data.test_y, batch_size))
    figures = score((r for r in results if r is not None), len(data.test_x))
    stage.train()
    return figures if stage.is_last else None


def gather_from_every_stage(value, stage: PipelineStage, group) -> list:
    """Every stage's `value`, in rank order (a collective: every rank calls it); a stage that
    has gone (stopped, crashed) is a UserError here, not a traceback."""
    values = [None] * stage.world_size
    try:
        dist.all_gather_object(values, value, group=group)
    except RuntimeError as exc:  # gloo reports a closed or silent peer so
        reason = str(exc).split("] ", 1)[-1].split(". ")[0]
        raise UserError(f"stage {stage.rank}: another stage stopped before the run's end "
                        f"({reason}); each stage's last checkpoint stays") from None
    return values


def fit_pipeline(stage: PipelineStage, optimizer: torch.optim.Optimizer, data: MNIST, args, *,
                 model_name: str, method: str, out_dir: Path, checkpoint: dict | None,
                 extra_summary: dict) -> dict | None:
    """Train this rank's stage for args.epochs (cosine decay); the last stage prints the epoch
    lines and writes metrics.csv and summary.json, which it returns (others return None)."""
    device = data.train_x.device
    generator = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = num_batches(len(data.train_x), args.batch_size)
    scheduler = cosine_schedule(optimizer, args.epochs * steps_per_epoch)
    checkpoint_name = stage_checkpoint_name(stage.rank)
    collectives = dist.new_group(backend="gloo")  # for the few collectives, apart from p2p
    state, order = LoopState(), None
    if checkpoint is not None:
        if checkpoint.get("counts") != stage.counts:
            raise UserError(f"{out_dir / checkpoint_name} was written with stages "
                            f"{checkpoint.get('counts')}, not {stage.counts}")
        state, order = restore_training(checkpoint, stage, optimizer, scheduler, generator,
                                        device)
    steps = gather_from_every_stage(state.step, stage, collectives)
    if len(set(steps)) != 1:  # every rank sees it; stage 0 says it
        if stage.rank != 0:
            raise SystemExit(USER_ERROR_EXIT)
        raise UserError(f"the stage checkpoints in {out_dir} are from different steps {steps} "
                        "(a stage was stopped inside a checkpoint write); they cannot be "
                        "resumed together")
    columns = ([f"sg_loss{i}" for i in range(1, len(stage.positions) + 1)]
               if stage.is_last else [])
    log = (MetricsLog(out_dir / "metrics.csv", columns,
                      keep_rows=checkpoint["metrics_rows"] if checkpoint else None)
           if stage.is_last else None)

    def save() -> Path:
        stage.collect_targets()
        return save_checkpoint(out_dir, {
            "model": stage.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "state": asdict(state), "order": order,
            "rng_torch": torch.get_rng_state(), "rng_data": generator.get_state(),
            "rng_cuda": None, "metrics_rows": log.rows if log else 0, "counts": stage.counts,
            "world_size": stage.world_size}, name=checkpoint_name)

    session_start = time.perf_counter()
    wall_base = state.wall_seconds
    try:
        with _StopRequest() as stop:
            while state.epoch <= args.epochs:
                stage.train()
                if order is None:
                    order = batch_order(len(data.train_x), generator, device)
                # stages above the first receive their inputs and labels from below: they
                # draw only the labels (for the batch size), not the images
                inputs = data.train_x if stage.is_first else data.train_y
                stream = batches(inputs, data.train_y, args.batch_size, order, state.batch)
                bar = tqdm(total=steps_per_epoch, initial=state.batch, leave=False,
                           disable=None if stage.is_last else True, file=sys.stderr,
                           desc=f"epoch {state.epoch}/{args.epochs}")
                tick = time.perf_counter()
                while state.batch < steps_per_epoch:
                    x, y = next(stream)
                    if stop.signum is not None:
                        stage.request_stop(stop.signum)
                    logged = args.log_every > 0 and state.step % args.log_every == 0
                    # every step carries the synthesizer losses up, for the epoch's means
                    loss = stage.train_step(optimizer, x, y, report=True)
                    if stage.stopped is not None:
                        bar.close()
                        raise RunInterrupted(stage.stopped, save(), state.epoch, state.step)
                    scheduler.step()
                    row = _record_step(state, loss, len(y), logged, stage) if log else None
                    state.step += 1
                    state.batch += 1
                    bar.update()
                    now = time.perf_counter()
                    state.train_seconds += now - tick
                    state.wall_seconds = wall_base + now - session_start
                    tick = now
                    if row:
                        log.write({**row, "wall_seconds": state.wall_seconds})
                bar.close()
                if state.epoch == args.epochs:
                    # the synthesizer updates still owed; the cosine schedule is at 0 by now,
                    # so here they move only Adam's moments (the library's users may differ)
                    stage.drain(optimizer)
                figures = evaluate_pipeline(stage, data, args.batch_size)
                if stage.is_last:
                    finish_epoch(args, state, log, *figures)
                state.epoch, state.batch, order = state.epoch + 1, 0, None
                save()
        stage.flush()
    except PipelineError as exc:
        raise UserError(f"stage {stage.rank}: {exc}; this stage stops too") from None
    times = gather_from_every_stage(
        {"rank": stage.rank, "blocks": list(stage.block_range), "total_s": stage.times.total,
         "wait_s": stage.times.wait, "comm_s": stage.times.comm,
         "compute_s": stage.times.compute}, stage, collectives)
    if not stage.is_last:
        return None
    extra = {**extra_summary, "stages": stage.counts, "staleness": stage.staleness,
             "processes": stage.world_size, "interface_mode": stage.interface_mode,
             "interfaces_after": [i + 1 for i in stage.positions],
             "message_dtype": str(stage.message_dtype).removeprefix("torch."),
             "stage_times": times}
    return write_summary(state, args, out_dir, device, script="main.py", model_name=model_name,
                         method=method, extra=extra)


def _record_step(state: LoopState, loss: float | None, batch: int, logged: bool,
                 stage: PipelineStage) -> dict | None:
    """The last stage's bookkeeping of one step: loss sums, every synthesizer's loss (an edge
    synthesizer not trained yet, under staleness, reports nan and is left out), and the
    metrics row when logged."""
    if loss is None or not math.isfinite(loss):
        raise UserError(f"training diverged: non-finite loss at step {state.step} "
                        f"(epoch {state.epoch}); lower --lr")
    state.record_loss(loss, batch)
    losses = stage.upstream_synthesizer_losses() + stage.synthesizer_losses()
    state.record({f"sg_loss{i}": v for i, v in enumerate(losses, start=1)})
    return state.logged_row() if logged else None


def train_as_pipeline(args, build_net, *, model_name: str, method: str, synthesizer_options: dict,
                      extra_summary: dict) -> None:
    """main.py under torchrun: join the process group, build this rank's stage of
    `build_net()` (called after seeding, identically on every rank) and train it."""
    from experiment.cli import prepare_run, resolve_device

    device = resolve_device(args.device)
    start_process_group(device, args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        args.out = shared_out_dir(args.out)
        # config.json on every machine (local rank 0 of each), so each can --resume
        device, out_dir, data, checkpoint = prepare_run(
            args, "main.py", primary=int(os.environ.get("LOCAL_RANK", "0")) == 0,
            checkpoint_name=stage_checkpoint_name(rank))
        net = build_net().to(device)
        try:
            stage = PipelineStage(net, data.train_x[:2], synthesizer=args.synthesizer,
                                  counts=args.stages, interfaces=args.interfaces,
                                  context_size=10 if args.conditioned else 0,
                                  grad_scale=args.grad_scale, staleness=args.staleness,
                                  timeout=args.timeout, max_batch=args.batch_size,
                                  message_dtype=MESSAGE_DTYPES[args.message_dtype],
                                  **synthesizer_options)
        except ValueError as exc:  # the same on every rank: one of them says it
            if rank == 0:
                raise UserError(f"--stages: {exc} ({world} processes)") from None
            raise SystemExit(USER_ERROR_EXIT) from None
        optimizer = adam(stage.param_groups(args.lr, args.synth_lr), lr=args.lr)
        fit_pipeline(stage, optimizer, data, args, model_name=model_name, method=method,
                     out_dir=out_dir, checkpoint=checkpoint,
                     extra_summary={**extra_summary, "stage_blocks": stage.counts})
    except RunInterrupted as exc:
        if rank != world - 1:  # the last stage, which keeps the records, says where to resume
            raise SystemExit(exc.exit_code) from None
        raise
    finally:
        dist.destroy_process_group()
