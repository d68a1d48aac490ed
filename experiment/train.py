"""Training by epochs, on `experiment.loop.TrainingLoop`: what every MNIST script shares
(mini-batches by index, a cosine schedule, evaluation and one line per epoch, the epoch's
figures, summary.json) and `fit`, its step for one process. The step is plain backprop-style
PyTorch; a DNI model runs through it unchanged (its synthetic gradients happen inside its
forward)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from experiment.data import ImageSplits, batch_order, batches, num_batches
from experiment.errors import UserError
from experiment.loop import TrainingLoop
from experiment.records import CHECKPOINT, MetricsLog, write_json
from experiment.schedules import rate_factor


@dataclass
class Probe:
    """What a method adds to the loop.

    `forward(model, x, y)` runs the model on a training batch (default `model(x)`).
    `every_step(model)` reads figures after every step (e.g. each synthesizer's loss): a
    step row holds their mean since the last row, the epoch row their epoch mean.
    `measure(model, x, y)` runs before a measured step and must not touch training (e.g. the
    cosine to the true gradient); the loop measures on every logged step and on each epoch's
    last step, so each epoch row holds the mean of that epoch's own measurements.
    Both return {column: value} for names in `columns`. `nonfinite(model)`, asked once a
    gradient is found non-finite, names the internal quantity at its root (or None).
    """

    forward: Callable | None = None
    measure: Callable[..., dict[str, float]] | None = None
    every_step: Callable[..., dict[str, float]] | None = None
    nonfinite: Callable[..., str | None] | None = None
    columns: list[str] = field(default_factory=list)


@dataclass
class LoopState:
    """Where training stands: everything besides model, optimizer and RNGs that an exact
    resume needs."""

    epoch: int = 1                 # epoch in progress (1-based)
    batch: int = 0                 # next batch within the epoch
    step: int = 0                  # optimizer steps done
    loss_sum: float = 0.0          # this epoch's summed training loss
    epoch_samples: int = 0
    window_loss: float = 0.0       # training loss since the last logged step
    window_steps: int = 0
    metric_sums: dict = field(default_factory=dict)    # this epoch's figures: sums, counts
    metric_counts: dict = field(default_factory=dict)
    window_sums: dict = field(default_factory=dict)    # every-step figures since the last row
    window_counts: dict = field(default_factory=dict)
    samples: int = 0
    train_seconds: float = 0.0
    data_seconds: float = 0.0
    wall_seconds: float = 0.0
    history: list = field(default_factory=list)

    def record_loss(self, value: float, batch: int) -> None:
        """Add one step's training loss to the epoch's and the logging window's sums."""
        self.loss_sum += value * batch
        self.epoch_samples += batch
        self.window_loss += value
        self.window_steps += 1

    def record(self, figures: dict[str, float], window: bool = True) -> None:
        """Add figures (non-finite ones are left out) to the epoch's sums and, with `window`,
        to the logging window's."""
        sums = [(self.metric_sums, self.metric_counts)]
        if window:
            sums.append((self.window_sums, self.window_counts))
        for name, v in figures.items():
            if v is None or not math.isfinite(v):
                continue
            for total, count in sums:
                total[name] = total.get(name, 0.0) + v
                count[name] = count.get(name, 0) + 1

    def logged_row(self, measured: dict[str, float] | None = None) -> dict:
        """Close the logging window: the metrics.csv row (without wall_seconds) of the
        window's means and the figures `measured` at this step (added to the epoch's)."""
        measured = {k: v for k, v in (measured or {}).items()
                    if v is not None and math.isfinite(v)}
        self.record(measured, window=False)
        means = {n: self.window_sums[n] / self.window_counts[n] for n in self.window_sums}
        row = {**means, **measured, "kind": "step", "step": self.step, "epoch": self.epoch,
               "train_loss": self.window_loss / self.window_steps}
        self.window_loss, self.window_steps = 0.0, 0
        self.window_sums, self.window_counts = {}, {}
        return row


def score(outputs: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int
          ) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (fraction) over (output, labels) batches that cover
    `count` examples."""
    total_loss, correct = 0.0, 0
    for out, labels in outputs:
        total_loss += F.cross_entropy(out, labels, reduction="sum").item()
        correct += (out.argmax(1) == labels).sum().item()
    return total_loss / count, correct / count


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (fraction) of the model in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        figures = score(((model(xb), yb) for xb, yb in batches(x, y, batch_size)), len(x))
    model.train(was_training)
    return figures


def adam(params, lr: float, capturable: bool = False) -> torch.optim.Adam:
    """The scripts' optimizer: Adam with its fused kernel, one pass over each tensor a step.
    The default on CPU, one tensor at a time, makes several passes and temporaries; on the
    MLP's first block it took half of a pipeline stage's step (bench/README.md).
    `capturable`: its step may be captured in a CUDA graph (experiment.graphed)."""
    return torch.optim.Adam(params, lr=lr, fused=True, capturable=capturable)


def learning_rate_schedule(optimizer: torch.optim.Optimizer, total_steps: int, kind: str = "cosine"
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Every parameter group's learning rate times `rate_factor(kind, step, total_steps)`."""
    rate_factor(kind, 0, total_steps)  # an unknown kind fails here, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: rate_factor(kind, step, total_steps))


def format_fields(fields: dict[str, float]) -> str:
    """'name value' pairs for the epoch line, compact but readable."""
    return "  ".join(f"{name} {value:.3g}" if abs(value) < 1e-2 and value else
                     f"{name} {value:.4f}" for name, value in fields.items())


def first_nonfinite_gradient(named_params: list[tuple[str, torch.nn.Parameter]]) -> str | None:
    """Name of the first parameter whose gradient norm is a NaN or inf, "gradient norm" when
    only their sum overflows, None when it is finite (one sync in all)."""
    with_grad = [(n, p.grad) for n, p in named_params if p.grad is not None]
    if not with_grad:
        return None
    norms = torch._foreach_norm([g for _, g in with_grad])
    if torch.isfinite(torch.stack(norms).sum()):
        return None
    return nonfinite_norm_name([n for n, _ in with_grad], norms)


def nonfinite_norm_name(names: list[str], norms) -> str:
    """The name of the first non-finite norm of `norms` (one per name), "gradient norm" when
    each is finite and only their sum overflowed."""
    return next((n for n, norm in zip(names, norms) if not torch.isfinite(norm)),
                "gradient norm")


class EpochLoop(TrainingLoop):
    """Epochs of mini-batches drawn by index from a fresh order each epoch, under the
    learning-rate schedule args.schedule names (cosine when absent), with `evaluate_epoch` at each epoch's end: what `fit` and the
    pipeline's stages share. A subclass gives `train_step` and `evaluate_epoch`."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: ImageSplits,
                 args: argparse.Namespace, out_dir: Path, columns: list[str],
                 checkpoint: dict | None, checkpoint_name: str = CHECKPOINT,
                 keeps_records: bool = True):
        self.checkpoint_name = checkpoint_name
        super().__init__(out_dir, model, optimizer, torch.Generator().manual_seed(args.seed),
                         data.train_x.device, LoopState(), columns if keeps_records else None,
                         checkpoint)
        self.data, self.args = data, args
        self.steps_per_epoch = num_batches(len(data.train_x), args.batch_size)
        self.scheduler = learning_rate_schedule(optimizer, args.epochs * self.steps_per_epoch,
                                         getattr(args, "schedule", "cosine"))
        self.order: torch.Tensor | None = None   # this epoch's batch order
        self.stream = None
        if checkpoint is not None:
            self.restore(checkpoint)

    def restore(self, checkpoint: dict) -> list[float]:
        """Model, optimizer, schedule, RNGs, loop state and batch order; the learning rates
        this run's flags give take over at the saved point of the schedule."""
        flag_lrs = super().restore(checkpoint)
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scheduler.base_lrs = flag_lrs
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group, base in zip(self.optimizer.param_groups, flag_lrs):
            group["initial_lr"], group["lr"] = base, base * factor
        self.state, self.order = LoopState(**checkpoint["state"]), checkpoint["order"]
        return flag_lrs

    def snapshot(self) -> dict:
        """The common checkpoint, the schedule and the epoch's batch order."""
        return {**super().snapshot(), "scheduler": self.scheduler.state_dict(),
                "order": self.order}

    def finished(self) -> bool:
        return self.state.epoch > self.args.epochs

    def period_over(self) -> bool:
        return self.state.batch >= self.steps_per_epoch

    def inputs(self) -> torch.Tensor:
        """What the batches gather besides the labels: the images."""
        return self.data.train_x

    def begin_period(self) -> None:
        self.model.train()
        if self.order is None:
            self.order = batch_order(len(self.data.train_x), self.generator, self.device)
        self.stream = batches(self.inputs(), self.data.train_y, self.args.batch_size,
                              self.order, self.state.batch)

    def progress(self) -> tuple[int, int, str]:
        return (self.steps_per_epoch, self.state.batch,
                f"epoch {self.state.epoch}/{self.args.epochs}")

    def where(self, period_ended: bool) -> int | None:
        return self.state.epoch - (1 if period_ended else 0)

    def evaluate_epoch(self) -> None:
        """At the end of an epoch: evaluate, print the epoch line, write the epoch row."""
        raise NotImplementedError

    def end_period(self) -> None:
        self.evaluate_epoch()
        self.state.epoch, self.state.batch, self.order = self.state.epoch + 1, 0, None


class _FitLoop(EpochLoop):
    """`fit`'s step: a forward and backward of the whole model (a DNI model's synthetic
    gradients happen inside its forward), the divergence check, the probe's figures."""

    def __init__(self, model, optimizer, data, args: argparse.Namespace, out_dir, probe: Probe,
                 checkpoint: dict | None):
        super().__init__(model, optimizer, data, args, out_dir, probe.columns, checkpoint)
        self.probe = probe
        self.forward = probe.forward or (lambda m, x, y: m(x))
        self.named_params = list(model.named_parameters())

    def train_step(self) -> dict | None:
        state, probe, args, model = self.state, self.probe, self.args, self.model
        begin = time.perf_counter()
        x, y = next(self.stream)
        state.data_seconds += time.perf_counter() - begin
        logged = args.log_every > 0 and state.step % args.log_every == 0
        measured = {}
        if probe.measure and (logged or state.batch == self.steps_per_epoch - 1):
            begin = time.perf_counter()
            measured = probe.measure(model, x, y)
            self.diagnostic_seconds += time.perf_counter() - begin
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.forward(model, x, y), y)
        loss.backward()
        bad = "loss" if not torch.isfinite(loss) else first_nonfinite_gradient(self.named_params)
        if bad and bad != "loss" and probe.nonfinite:  # name the root cause if known
            bad = probe.nonfinite(model) or bad
        if bad:
            raise self.diverged(bad, "lower --lr")
        self.optimizer.step()
        self.scheduler.step()
        state.record_loss(loss.item(), len(y))
        if probe.every_step:
            state.record(probe.every_step(model))
        row = None
        if logged:
            row = state.logged_row(measured)
        elif measured:
            state.record(measured, window=False)
        state.batch += 1
        return row

    def evaluate_epoch(self) -> None:
        finish_epoch(self.args, self.state, self.log,
                     *evaluate(self.model, self.data.test_x, self.data.test_y))


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: ImageSplits,
        args: argparse.Namespace, *, script: str, model_name: str, method: str, out_dir: Path,
        probe: Probe | None = None, extra_summary: dict | None = None,
        checkpoint: dict | None = None) -> dict:
    """Train for args.epochs (cosine learning-rate decay), from `checkpoint` when resuming;
    print a line per epoch; write metrics.csv, checkpoint.pt and summary.json; return the
    summary."""
    loop = _FitLoop(model, optimizer, data, args, out_dir, probe or Probe(), checkpoint)
    loop.run()
    return write_summary(loop.state, args, out_dir, loop.device, script=script,
                         model_name=model_name, method=method, extra=extra_summary or {})


def finish_epoch(args: argparse.Namespace, state: LoopState, log: MetricsLog, test_loss: float,
                 test_acc: float) -> None:
    """Print the epoch line, record the epoch row, and reset the epoch's sums."""
    if state.epoch_samples == 0:
        raise UserError("no training batch in this epoch")
    train_loss = state.loss_sum / state.epoch_samples
    extras = {n: state.metric_sums[n] / state.metric_counts[n]
              for n in sorted(state.metric_sums, key=log.columns.index)}
    record = {"epoch": state.epoch, "train_loss": train_loss, "test_loss": test_loss,
              "test_acc": test_acc, "wall_seconds": state.wall_seconds,
              "train_seconds": state.train_seconds, **extras}
    state.history.append(record)
    state.samples += state.epoch_samples
    log.write({"kind": "epoch", "step": state.step, **record})
    seconds = state.wall_seconds - (state.history[-2]["wall_seconds"]
                                    if len(state.history) > 1 else 0.0)
    print(f"epoch {state.epoch:>3}/{args.epochs}  train_loss {train_loss:.4f}  "
          f"test_loss {test_loss:.4f}  test_acc {100 * test_acc:.2f}%  {seconds:.1f}s"
          + (f"  {format_fields(extras)}" if extras else ""), flush=True)
    state.loss_sum, state.epoch_samples = 0.0, 0
    state.metric_sums, state.metric_counts = {}, {}


def write_summary(state: LoopState, args: argparse.Namespace, out_dir: Path, device, *,
                  script: str, model_name: str, method: str, extra: dict) -> dict:
    """summary.json from the finished run's state."""
    last = state.history[-1]
    figures = {k: v for k, v in last.items() if k not in ("epoch", "wall_seconds",
                                                          "train_seconds")}
    summary = {
        "script": script, "model": model_name, "method": method, "epochs": args.epochs,
        "test_acc": last["test_acc"], "test_loss": last["test_loss"],
        "train_seconds": state.train_seconds, "samples_per_s": state.samples / state.train_seconds,
        "data_seconds": state.data_seconds, "device": str(device), "seed": args.seed,
        "batch_size": args.batch_size, "lr": args.lr, "train_size": args.train_size,
        "argv": sys.argv, **figures, **extra, "history": state.history,
    }
    write_json(out_dir / "summary.json", summary)
    print(f"test accuracy {100 * summary['test_acc']:.2f}%  "
          f"({summary['samples_per_s']:.0f} samples/s); run records in {out_dir}")
    return summary
