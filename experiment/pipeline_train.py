"""main.py under torchrun: the MNIST network as a pipeline of `dni.pipeline.PipelineStage`s,
one per process. Every rank runs the same loop; stage 0 draws the mini-batches, the last
stage computes the loss and keeps the run records (metrics.csv, summary.json, the epoch
lines). Each stage writes its own checkpoint, and `--resume` restarts them together."""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from dni.pipeline import PipelineError, PipelineStage
from experiment.data import ImageSplits, batches
from experiment.errors import USER_ERROR_EXIT, RunInterrupted, UserError
from experiment.loop import TrainingLoop
from experiment.records import peak_memory_mb
from experiment.train import EpochLoop, adam, finish_epoch, score, write_summary


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
    cores); on CUDA, NCCL with a GPU per local rank, or, with fewer GPUs than local ranks
    (several stages share a GPU, which NCCL refuses), gloo with the messages staged through
    host memory."""
    backend = "gloo"
    if device.type == "cpu":
        pin_to_cores()
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        gpus = torch.cuda.device_count()
        if gpus >= int(os.environ.get("LOCAL_WORLD_SIZE", "1")):
            backend = "nccl"
        torch.cuda.set_device(local % gpus)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))


@contextmanager
def stage_process(device: torch.device, timeout: float) -> Iterator[tuple[int, int]]:
    """This process as one stage of a torchrun job for the body: (rank, world size). A stop
    (RunInterrupted) is reported by the last stage only, which keeps the records and says
    where to resume; the others exit with its status. The process group is left at the end."""
    start_process_group(device, timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        yield rank, world
    except RunInterrupted as exc:
        if rank != world - 1:
            raise SystemExit(exc.exit_code) from None
        raise
    finally:
        dist.destroy_process_group()


def shared_out_dir(out: str | None, script: str = "main") -> str:
    """The run folder every rank agrees on: rank 0's choice (its default name, under runs/,
    has the script's name and a time)."""
    chosen = [out or f"runs/{script}-{time.strftime('%Y%m%d-%H%M%S')}"]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def stage_checkpoint_name(rank: int) -> str:
    """File name of one stage's checkpoint in the run folder."""
    return f"checkpoint-stage{rank}.pt"


def evaluate_pipeline(stage: PipelineStage, data: ImageSplits, batch_size: int
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


class _StageLoop(EpochLoop):
    """A pipeline stage's step: this stage's part of the mini-batch, in step with its
    neighbours. A signal goes to the stage, which stops the whole pipeline after the step in
    progress (every stage saves); the last stage keeps the records. A step's synthesizer
    losses and cosines reach the last stage with the next step's message (or the
    evaluation's, or the stop's), so its metrics.csv row is written then, under its own
    step; cosines are measured on the steps one process measures them on."""

    stops_at_once = False

    def __init__(self, stage: PipelineStage, optimizer, data, args: argparse.Namespace, out_dir,
                 checkpoint: dict | None):
        self.stage = stage
        self.show_progress = stage.is_last
        columns = [f"{name}{i}" for name in ("sg_loss", "cos")
                   for i in range(1, len(stage.positions) + 1)]
        super().__init__(stage, optimizer, data, args, out_dir, columns, checkpoint,
                         checkpoint_name=stage_checkpoint_name(stage.rank),
                         keeps_records=stage.is_last)

    def inputs(self) -> torch.Tensor:
        # stages above the first receive their inputs and labels from below: they draw only
        # the labels (for the batch size), not the images
        return self.data.train_x if self.stage.is_first else self.data.train_y

    def pass_on_stop(self, signum: int) -> None:
        self.stage.request_stop(signum)

    def logged(self, step: int) -> bool:
        """Whether `step` writes a metrics.csv row."""
        return self.args.log_every > 0 and step % self.args.log_every == 0

    def train_step(self) -> dict | None:
        state, stage = self.state, self.stage
        x, y = next(self.stream)
        # as one process: cosines on logged steps and on each epoch's last step
        measure = self.logged(state.step) or state.batch == self.steps_per_epoch - 1
        # every step carries the synthesizer losses up, for the epoch's means
        loss = stage.train_step(self.optimizer, x, y, report=True, measure=measure)
        self.diagnostic_seconds += stage.last_measure_seconds
        self.record_step_figures()   # the step before this one's: they came with its message
        if stage.stopped is not None:
            raise self.interrupted(stage.stopped)
        self.scheduler.step()
        if stage.is_last:
            if loss is None or not math.isfinite(loss):
                raise self.diverged("loss", "lower --lr")
            state.record_loss(loss, len(y))
        state.batch += 1
        return None

    def record_step_figures(self) -> None:
        """Last stage: record the figures of the step that arrived last (if not yet), and
        write that step's metrics.csv row if it logs one (its train_loss window ends there).
        An edge synthesizer not fitted yet (staleness) and an unmeasured cosine are nan, and
        left out."""
        figures = self.stage.reported_figures()
        if figures is None:
            return
        state = self.state
        state.record({f"sg_loss{i}": v for i, v in enumerate(figures.losses, start=1)})
        measured = {f"cos{i}": v for i, v in enumerate(figures.cosines, start=1)}
        if self.logged(figures.step):
            row = {**state.logged_row(measured), "step": figures.step}
            self.log.write({**row, "wall_seconds": state.wall_seconds})
        else:
            state.record(measured, window=False)

    def evaluate_epoch(self) -> None:
        if self.state.epoch == self.args.epochs:
            # the synthesizer updates still owed, at the rates the schedule ends on: under
            # cosine (0 by now) they move only Adam's moments, under constant or step they
            # also move the edge synthesizers (never the blocks: only those have gradients)
            self.stage.drain(self.optimizer)
        figures = evaluate_pipeline(self.stage, self.data, self.args.batch_size)
        if self.stage.is_last:
            self.record_step_figures()   # the epoch's last step's came with the evaluation
            finish_epoch(self.args, self.state, self.log, *figures)

    def snapshot(self) -> dict:
        self.stage.collect_targets()  # pending updates complete, so the state is whole
        return {**super().snapshot(), "counts": self.stage.counts,
                "world_size": self.stage.world_size}


def lost_neighbour(rank: int, exc: PipelineError) -> UserError:
    """The one-line error of stage `rank` when a neighbour died, went silent or fell out of
    step."""
    return UserError(f"stage {rank}: {exc}; this stage stops too")


def run_stages(loop: TrainingLoop, stage: PipelineStage, out_dir: Path,
               checkpoint: dict | None, collectives) -> list[dict]:
    """Run a stage's loop (its subclass of TrainingLoop, checkpoint named per stage) to the
    end, checking first that every stage resumes from the same step; a dead or silent
    neighbour is one error line; a stop that came too late to stop a step ends every stage
    as the signal asks, the run saved. Returns every stage's times (and peak memory)."""
    if checkpoint is not None and checkpoint.get("counts") != stage.counts:
        raise UserError(f"{out_dir / stage_checkpoint_name(stage.rank)} was written with "
                        f"stages {checkpoint.get('counts')}, not {stage.counts}")
    steps = gather_from_every_stage(loop.state.step, stage, collectives)
    if len(set(steps)) != 1:  # every rank sees it; stage 0 says it
        if stage.rank != 0:
            raise SystemExit(USER_ERROR_EXIT)
        raise UserError(f"the stage checkpoints in {out_dir} are from different steps {steps} "
                        "(a stage was stopped inside a checkpoint write); they cannot be "
                        "resumed together")
    try:
        loop.run()
        stage.flush()
    except PipelineError as exc:
        raise lost_neighbour(stage.rank, exc) from None
    # a stop that came too late to stop a step (in the last steps, on its way down to stage
    # 0, or during the final evaluation): the run is whole and saved; every stage ends as
    # the signal asks, as one process does after its final evaluation
    requests = gather_from_every_stage(stage.stop_requested, stage, collectives)
    signum = next((signal for signal in requests if signal), 0)
    if signum:
        raise loop.interrupted(signum, period_ended=True,
                               path=out_dir / stage_checkpoint_name(stage.rank))
    return gather_from_every_stage(
        {"rank": stage.rank, "blocks": list(stage.block_range), "total_s": stage.times.total,
         "wait_s": stage.times.wait, "comm_s": stage.times.comm,
         "compute_s": stage.times.compute, "peak_memory_mb": peak_memory_mb(stage.device)},
        stage, collectives)


def fit_pipeline(stage: PipelineStage, optimizer: torch.optim.Optimizer, data: ImageSplits,
                 args: argparse.Namespace, *, model_name: str, method: str, out_dir: Path,
                 checkpoint: dict | None, extra_summary: dict) -> dict | None:
    """Train this rank's stage for args.epochs (learning rates as --schedule says); the last stage prints the epoch
    lines and writes metrics.csv and summary.json, which it returns (others return None)."""
    collectives = dist.new_group(backend="gloo")  # for the few collectives, apart from p2p
    loop = _StageLoop(stage, optimizer, data, args, out_dir, checkpoint)
    times = run_stages(loop, stage, out_dir, checkpoint, collectives)
    if not stage.is_last:
        return None
    extra = {**extra_summary, "stages": stage.counts, "staleness": stage.staleness,
             "processes": stage.world_size, "interface_mode": stage.interface_mode,
             "interfaces_after": [i + 1 for i in stage.positions],
             "message_dtype": str(stage.message_dtype).removeprefix("torch."),
             "stage_times": times}
    return write_summary(loop.state, args, out_dir, loop.device, script="main.py",
                         model_name=model_name, method=method, extra=extra)


def train_as_pipeline(args: argparse.Namespace, build_net, *, model_name: str, method: str,
                      synthesizer_options: dict, extra_summary: dict) -> None:
    """main.py under torchrun: join the process group, build this rank's stage of
    `build_net()` (called after seeding, identically on every rank) and train it."""
    from experiment.cli import prepare_run, resolve_device

    with stage_process(resolve_device(args.device), args.timeout) as (rank, world):
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
                                  message_dtype=getattr(torch, args.message_dtype),  # a dtype's name
                                  center_gradients=args.center_gradients,
                                  **synthesizer_options)
        except ValueError as exc:  # the same on every rank: one of them says it
            if rank == 0:
                raise UserError(f"--stages: {exc} ({world} processes)") from None
            raise SystemExit(USER_ERROR_EXIT) from None
        optimizer = adam(stage.param_groups(args.lr, args.synth_lr), lr=args.lr)
        fit_pipeline(stage, optimizer, data, args, model_name=model_name, method=method,
                     out_dir=out_dir, checkpoint=checkpoint,
                     extra_summary={**extra_summary, "stage_blocks": stage.counts})
