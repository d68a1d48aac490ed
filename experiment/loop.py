"""The one training loop every script runs: steps in periods (an epoch, or a checkpoint
interval), a progress bar, training and wall time, metrics.csv rows, a checkpoint at every
period's end and on SIGINT/SIGTERM, divergence as one line, and exact resume.

A trainer subclasses `TrainingLoop` and gives what differs: its step (`train_step`), where a
period begins and ends, when the run is done, and what its checkpoint holds beyond the common
parts (model, optimizer, loop state, random number generators, metrics rows).
`experiment.train.fit` (the MNIST scripts), `experiment.pipeline_train.fit_pipeline` (a
pipeline stage under torchrun) and `experiment.rnn_train.train` (rnn_tasks.py) are the three.
(bench/paper_budget.py's graphs engine steps several runs in turn, one model each, with
`experiment.graphed`; it keeps its own small loop because this one holds one model.)
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from experiment.errors import RunInterrupted, UserError
from experiment.records import CHECKPOINT, MetricsLog, save_checkpoint

# a signal this soon after the first is the same request delivered twice (Ctrl-C reaches
# every process of the terminal's group, and torchrun forwards it to its workers as well)
DUPLICATE_SIGNAL_SECONDS = 1.0


class StopRequest:
    """Turns SIGINT/SIGTERM into a request to stop after the current step (`signum`); a
    second one, later than DUPLICATE_SIGNAL_SECONDS, stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signum: int | None = None
        self.since = 0.0
        self.previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.signum is not None and now - self.since > DUPLICATE_SIGNAL_SECONDS:
            raise KeyboardInterrupt  # asked again: stop at once
        if self.signum is None:
            self.signum, self.since = signum, now

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def load_model_and_optimizer(checkpoint: dict, model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer) -> list[float]:
    """Load the model's and optimizer's states from `checkpoint` (a mismatch is a UserError);
    return the learning rates the optimizer had before, i.e. this run's flags."""
    flag_lrs = [group["lr"] for group in optimizer.param_groups]
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"the checkpoint does not fit this model ({str(exc)[:120]}...)"
                        ) from None
    return flag_lrs


class TrainingLoop:
    """The loop; a subclass defines `finished`, `period_over`, `train_step` and, where it
    needs them, the other hooks below. `state` is a dataclass with at least `step`,
    `train_seconds` and `wall_seconds`; it is checkpointed whole. `columns`: the metrics.csv
    columns beyond the common ones (None: this process keeps no records); the file is opened
    (and, on resume, cut back to the checkpoint's rows) only when `run` starts, so a resume
    refused before then leaves it as it was."""

    checkpoint_name: str = CHECKPOINT
    stops_at_once: bool = True      # False: a signal is passed on (`pass_on_stop`) instead
    show_progress: bool = True

    def __init__(self, out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 generator: torch.Generator, device: torch.device, state,
                 columns: list[str] | None, checkpoint: dict | None):
        self.out_dir, self.model, self.optimizer = out_dir, model, optimizer
        self.generator, self.device, self.state = generator, device, state
        self.columns = columns
        self.kept_rows = checkpoint["metrics_rows"] if checkpoint is not None else None
        self.log: MetricsLog | None = None
        self.diagnostic_seconds = 0.0   # a step's time spent on diagnostics, not training

    # what a trainer defines
    def finished(self) -> bool:
        """Whether the run has done all its steps."""
        raise NotImplementedError

    def period_over(self) -> bool:
        """Whether the period in progress (an epoch, a checkpoint interval) has ended."""
        raise NotImplementedError

    def train_step(self) -> dict | None:
        """One optimizer step; its metrics.csv row (without wall_seconds) when it logs one.
        The loop counts `state.step` after it."""
        raise NotImplementedError

    def begin_period(self) -> None:
        """Before a period's first step (e.g. draw the epoch's batch order)."""

    def end_period(self) -> None:
        """After a period's last step, before its checkpoint (e.g. evaluate)."""

    def after_step(self) -> None:
        """After a step is counted and timed (e.g. a printed line; not training time)."""

    def progress(self) -> tuple[int, int, str]:
        """The progress bar of this period: (total, done, description)."""
        return 0, 0, ""

    def where(self, period_ended: bool) -> int | None:
        """The epoch a stop message names (None: the run has no epochs)."""
        return None

    def pass_on_stop(self, signum: int) -> None:
        """With stops_at_once False: hand a signal to whatever stops the run (a pipeline)."""

    def snapshot(self) -> dict:
        """The checkpoint's contents; subclasses add their own to these."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "state": asdict(self.state), "rng_torch": torch.get_rng_state(),
                "rng_data": self.generator.get_state(), "rng_cuda": cuda,
                "metrics_rows": self.log.rows if self.log is not None else 0}

    # shared
    def restore(self, checkpoint: dict) -> list[float]:
        """Load model, optimizer and random number generators from `checkpoint`; return the
        learning rates this run's flags gave the optimizer (they take over)."""
        flag_lrs = load_model_and_optimizer(checkpoint, self.model, self.optimizer)
        torch.set_rng_state(checkpoint["rng_torch"].cpu())
        self.generator.set_state(checkpoint["rng_data"].cpu())
        if self.device.type == "cuda" and checkpoint.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng_cuda"].cpu(), self.device)
        return flag_lrs

    def save(self) -> Path:
        """Write the checkpoint (atomically); return its path."""
        return save_checkpoint(self.out_dir, self.snapshot(), name=self.checkpoint_name)

    def interrupted(self, signum: int, period_ended: bool = False,
                    path: Path | None = None) -> RunInterrupted:
        """The stop by `signum`, with the checkpoint saved (now, unless `path` is given)."""
        return RunInterrupted(signum, path or self.save(), self.where(period_ended),
                              self.state.step)

    def diverged(self, what: str, advice: str) -> UserError:
        """The one-line error for a non-finite `what` at this step."""
        epoch = self.where(False)
        at = f" (epoch {epoch})" if epoch is not None else ""
        kept = ("; the last good checkpoint stays"
                if (self.out_dir / self.checkpoint_name).exists() else "")
        return UserError(f"training diverged: non-finite {what} at step {self.state.step}"
                         f"{at}{kept}; {advice}")

    def run(self) -> None:
        """Train until `finished()`, period by period; a signal saves and raises
        RunInterrupted (after the step in progress, or at once on a second one)."""
        state = self.state
        if self.columns is not None and self.log is None:
            self.log = MetricsLog(self.out_dir / "metrics.csv", self.columns,
                                  keep_rows=self.kept_rows)
        session_start, wall_base = time.perf_counter(), state.wall_seconds
        with StopRequest() as stop:
            while not self.finished():
                self.begin_period()
                total, done, desc = self.progress()
                bar = tqdm(total=total, initial=done, desc=desc, leave=False, file=sys.stderr,
                           disable=None if self.show_progress else True)
                try:
                    tick = time.perf_counter()
                    while not self.period_over():
                        self.diagnostic_seconds = 0.0
                        if not self.stops_at_once and stop.signum is not None:
                            self.pass_on_stop(stop.signum)
                        row = self.train_step()
                        state.step += 1
                        bar.update()
                        now = time.perf_counter()
                        state.train_seconds += now - tick - self.diagnostic_seconds
                        state.wall_seconds = wall_base + now - session_start
                        if row is not None and self.log is not None:
                            self.log.write({**row, "wall_seconds": state.wall_seconds})
                        self.after_step()
                        if self.stops_at_once and stop.signum is not None:
                            raise self.interrupted(stop.signum)
                        tick = time.perf_counter()
                finally:
                    bar.close()
                self.end_period()
                path = self.save()
                if self.stops_at_once and stop.signum is not None:
                    raise self.interrupted(stop.signum, period_ended=True, path=path)
            if not self.stops_at_once and stop.signum is not None:
                self.pass_on_stop(stop.signum)   # one after the last step, for the run's end


class StepPeriodLoop(TrainingLoop):
    """A loop whose periods are `period_steps` optimizer steps (a checkpoint or evaluation
    interval), the last one cut short when the run finishes."""

    period_steps: int = 1
    period_start: int = 0

    def begin_period(self) -> None:
        self.period_start = self.state.step

    def period_over(self) -> bool:
        step = self.state.step
        return self.finished() or (step > self.period_start
                                   and step % self.period_steps == 0)
