"""Several rnn_tasks.py runs of one setting (seeds) trained side by side in one process, as
one stacked model (experiment/stacked_runs.py): each run keeps its own weights, optimizer
state, data stream and curriculum, so each sequence batch holds the runs' sequences at their
own lengths, padded to the longest. Each run's folder gets the records rnn_tasks.py writes
(config.json, metrics.csv, summary.json, checkpoint.pt, the same format), so a run can be
resumed by itself with `rnn_tasks.py --resume`, and a group by this module, from its runs'
checkpoints at one step. A run that diverges stops the group with RunsDiverged, which names the
runs that went non-finite (every run's last checkpoint kept, so bench/rnn.py records those and
resumes the others).

Why: on a GPU a 128-unit LSTM's step is mostly kernel-launch overhead, and K runs in one
batched product cost little more than one. On a CPU the step is compute-bound and this gains
nothing (measured: bench/README.md, "The recurrent settings").
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from experiment.cli import prepare_out_dir, resolve_device
from experiment.errors import UserError
from experiment.loop import StepPeriodLoop, load_model_and_optimizer
from experiment.records import MetricsLog, load_checkpoint, save_checkpoint, write_config
from experiment.rnn_train import (
    COLUMNS,
    RunState,
    build_model,
    log_line,
    make_optimizer,
    mean_cosine,
    task_of,
    test_accuracy,
    write_summary,
)
from experiment.sequence_tasks import Batch, Curriculum
from experiment.stacked_runs import (
    run_optimizer_state,
    run_state_dict,
    stack_optimizer_states,
    stack_runs,
)
from experiment.train import nonfinite_norm_name

SHARED = ("task", "method", "truncation", "steps", "batch_size", "hidden", "core", "lr",
          "synth_lr", "synthesizer", "synth_input_window", "synth_hidden", "discount",
          "target_decay", "aux_weight",
          "clip", "threshold", "window", "max_length", "bits", "max_repeats", "data_dir",
          "log_every", "checkpoint_every")


class RunsDiverged(UserError):
    """Runs of a group went non-finite at a step: `errors` maps each one's folder to its error
    line, as rnn_tasks.py would print it alone."""

    def __init__(self, errors: dict[Path, str]):
        self.errors = errors
        super().__init__("; ".join(f"{out.name}: {error}" for out, error in errors.items()))


class _Member:
    """One run of the group: its flags, folder, data stream, curriculum and records."""

    def __init__(self, args: argparse.Namespace, device: torch.device, checkpoint: dict | None,
                 max_level: int):
        self.args, self.out_dir = args, Path(args.out)
        self.generator = torch.Generator(device=device).manual_seed(args.seed)
        self.curriculum = Curriculum(args.threshold, args.window, max_level=max_level)
        self.state = RunState()
        self.kept_rows = None
        self.log: MetricsLog | None = None
        if checkpoint is not None:
            self.state = RunState(**checkpoint["state"])
            self.curriculum = Curriculum(**self.state.curriculum)
            self.curriculum.threshold, self.curriculum.window = args.threshold, args.window
            self.generator.set_state(checkpoint["rng_data"].cpu())
            self.kept_rows = checkpoint["metrics_rows"]


class _GroupLoop(StepPeriodLoop):
    """The group's step: each run's batch at its own curriculum length, padded to the
    longest, through the stacked truncated BPTT; one checkpoint a run every
    --checkpoint-every steps."""

    def __init__(self, members: list[_Member], model: nn.Module, optimizer, task, device,
                 on_step: Callable[[int], None] | None = None):
        args = members[0].args
        state = RunState(step=members[0].state.step,
                         train_seconds=members[0].state.train_seconds,
                         wall_seconds=members[0].state.wall_seconds)
        super().__init__(members[0].out_dir, model, optimizer, members[0].generator, device,
                         state, None, None)
        self.members, self.task, self.args = members, task, args
        # each run's own clock so far: the group's time is added to it, not to the first's
        self.clock_offsets = [(m.state.train_seconds - state.train_seconds,
                               m.state.wall_seconds - state.wall_seconds) for m in members]
        self.period_steps = args.checkpoint_every
        self.network = list(model.named_parameters())
        self.clipped = model.network_parameters()
        self.last, self.on_step = None, on_step

    def run(self) -> None:
        for m in self.members:
            m.log = MetricsLog(m.out_dir / "metrics.csv", COLUMNS, keep_rows=m.kept_rows)
        super().run()

    def finished(self) -> bool:
        return self.state.step >= self.args.steps

    def progress(self) -> tuple[int, int, str]:
        a = self.args
        return (a.steps, self.state.step,
                f"{a.task} {a.method} T={a.truncation} x{len(self.members)} runs")

    def padded_batch(self) -> tuple[Batch, torch.Tensor, list[Batch]]:
        """The runs' batches side by side (run-major), zero after each run's end; the
        per-example lengths; the batches themselves."""
        batches = [self.task.sample(m.curriculum.level, self.args.batch_size, m.generator,
                                    self.device) for m in self.members]
        length = max(b.inputs.shape[0] for b in batches)

        def side_by_side(parts):
            out = parts[0].new_zeros(length, sum(p.shape[1] for p in parts), *parts[0].shape[2:])
            col = 0
            for p in parts:
                out[:p.shape[0], col:col + p.shape[1]] = p
                col += p.shape[1]
            return out

        mask = side_by_side([b.mask[:, None].expand(-1, b.inputs.shape[1]) for b in batches])
        lengths = torch.tensor([b.inputs.shape[0] for b in batches], device=self.device)
        stacked = Batch(side_by_side([b.inputs for b in batches]),
                        side_by_side([b.targets for b in batches]), mask, length)
        return stacked, lengths.repeat_interleave(self.args.batch_size), batches

    def run_losses(self, batch: Batch):
        """The chunk loss of every run, (K,): each run's scored steps, batch mean."""
        runs = len(self.members)

        def loss(prediction, t0, t1):
            elementwise = self.task.step_loss(prediction, batch.targets[t0:t1])
            rows = (elementwise * batch.mask[t0:t1, :, None]).sum((0, 2))
            return rows.view(runs, -1).sum(1) / self.args.batch_size
        return loss

    def train_step(self) -> None:
        args = self.args
        batch, lengths, batches = self.padded_batch()
        self.optimizer.zero_grad(set_to_none=True)
        report = self.model.trainer(batch.inputs, self.run_losses(batch), lengths=lengths)
        diverged = self.runs_diverged(report)
        if diverged is not None:
            raise diverged
        if args.clip > 0:
            clip_each_run(self.clipped, args.clip, len(self.members))
        self.optimizer.step()
        b = args.batch_size
        errors = torch.stack([self.task.errors(report.outputs[:one.inputs.shape[0],
                                                              k * b:(k + 1) * b], one)
                              for k, one in enumerate(batches)])
        none = torch.zeros_like(report.loss)
        figures = torch.stack([errors, report.loss,
                               none if report.synthesizer_loss is None
                               else report.synthesizer_loss,
                               none if report.aux_loss is None else report.aux_loss])
        for m, (errors_k, loss_k, sg_k, aux_k) in zip(self.members, figures.T.tolist()):
            w = m.state.window           # one transfer for all runs' figures (a GPU waits once)
            w["loss"] += loss_k
            w["errors"] += errors_k
            w["sg"] += sg_k
            w["aux"] += aux_k
            w["n"] += 1
            if m.curriculum.record(errors_k):
                m.state.levels.append([self.state.step + 1, m.curriculum.level])
        self.last = (batch, lengths)

    def runs_diverged(self, report) -> RunsDiverged | None:
        """The runs whose loss, synthetic-gradient loss or gradient went non-finite, each by
        the test it gets alone (its gradient: the sum of its parameters' norms, each norm over
        its slice of a stacked parameter); None if no run's did. One sync when all is finite."""
        grads = [(name, p.grad) for name, p in self.network if p.grad is not None]
        norms = torch.stack([g.flatten(1).norm(dim=1) for _, g in grads])       # (P, K)
        finite = torch.isfinite(report.loss) & torch.isfinite(norms.sum(0))
        if report.synthesizer_loss is not None:
            finite &= torch.isfinite(report.synthesizer_loss)
        if finite.all():
            return None
        errors = {}
        for k in (~finite).nonzero().flatten().tolist():
            what = ("loss" if not torch.isfinite(report.loss[k])
                    else "synthetic-gradient loss" if report.synthesizer_loss is not None
                    and not torch.isfinite(report.synthesizer_loss[k])
                    else nonfinite_norm_name([name for name, _ in grads], norms[:, k]))
            errors[self.members[k].out_dir] = str(self.diverged(what, "lower --lr or --discount"))
        return RunsDiverged(errors)

    def after_step(self) -> None:
        args, step = self.args, self.state.step
        for m, (train_offset, wall_offset) in zip(self.members, self.clock_offsets):
            m.state.step = step
            m.state.train_seconds = self.state.train_seconds + train_offset
            m.state.wall_seconds = self.state.wall_seconds + wall_offset
        if args.log_every > 0 and (step % args.log_every == 0 or step == args.steps):
            cosines = [None] * len(self.members)
            if args.method != "bptt":
                cosines = self.run_cosines(*self.last)
            for m, cosine in zip(self.members, cosines):
                log_line(m.args, m.state, m.curriculum, m.log, cosine, prefix=f"s{m.args.seed} ")
        if self.on_step is not None:
            self.on_step(step)

    def run_cosines(self, batch: Batch, lengths: torch.Tensor) -> list[float | None]:
        """Each run's synthetic-gradient cosine to the true future gradient, averaged over
        the chunk edges inside its sequence (as rnn_tasks.py logs it)."""
        pairs = self.model.trainer.future_gradients(batch.inputs, self.run_losses(batch))
        out = []
        b = self.args.batch_size
        for k in range(len(self.members)):
            end = int(lengths[k * b])
            out.append(mean_cosine([(g[k * b:(k + 1) * b], t[k * b:(k + 1) * b])
                                    for i, (g, t) in enumerate(pairs)
                                    if (i + 1) * self.model.trainer.truncation < end]))
        return out

    def save(self) -> Path:
        """Each run's checkpoint in its folder, in rnn_tasks.py's format."""
        model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        for k, m in enumerate(self.members):
            m.state.curriculum = asdict(m.curriculum)
            path = save_checkpoint(m.out_dir, {
                "model": run_state_dict(model, k), "optimizer": run_optimizer_state(optimizer, k),
                "state": asdict(m.state), "rng_torch": torch.get_rng_state(),
                "rng_data": m.generator.get_state(), "rng_cuda": cuda,
                "metrics_rows": m.log.rows if m.log is not None else 0})
            if k == 0:
                first = path
        return first


def clip_each_run(parameters: list[nn.Parameter], max_norm: float, runs: int) -> None:
    """clip_grad_norm_ run by run: each run's gradient (its slice of every stacked parameter)
    scaled to at most `max_norm`."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (K,)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(runs, *([1] * (g.dim() - 1))))


def step_seconds(runs: list, level: int, steps: int, device_name: str = "cpu"
                 ) -> tuple[float, float]:
    """(one run's step alone, the K runs' step side by side), medians in seconds of `steps`
    interleaved repeats at a fixed curriculum length `level`; nothing is written."""
    import statistics
    import time

    from experiment.rnn_train import SequenceLoop

    check_group(runs)
    device = resolve_device(device_name)
    first = runs[0]
    task = task_of(first)
    models = []
    for args in runs:
        torch.manual_seed(args.seed)
        models.append(build_model(args, task.input_size, task.output_size).to(device))
    alone = [SequenceLoop(args, model, make_optimizer(model, args), task, Path(args.out),
                          device, None, None) for args, model in zip(runs, models)]
    stacked = stack_runs(models)
    group = _GroupLoop([_Member(args, device, None, task.levels(args.max_length))
                        for args in runs], stacked,
                       make_optimizer(stacked, first), task, device)
    loops = [*[(loop, [loop.curriculum]) for loop in alone],
             (group, [m.curriculum for m in group.members])]
    times: list[list[float]] = [[] for _ in loops]
    for repeat in range(steps + 2):                      # the first two warm up
        for (loop, curricula), kept in zip(loops, times):
            for curriculum in curricula:
                curriculum.level = level
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            tick = time.perf_counter()
            loop.train_step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if repeat >= 2:
                kept.append(time.perf_counter() - tick)
    return (statistics.median(t for kept in times[:-1] for t in kept),
            statistics.median(times[-1]))


def check_group(runs: list) -> None:
    """Refuse runs that cannot share one stacked model (one line, a UserError)."""
    first = runs[0]
    for args in runs[1:]:
        differ = [name for name in SHARED if getattr(args, name) != getattr(first, name)]
        if differ:
            raise UserError(f"runs side by side must share their setting; --{differ[0]} "
                            "differs")
    if first.core != "lstm" or (first.method != "bptt" and first.synthesizer == "rnn"):
        raise UserError("runs side by side take an LSTM core and a linear, lowrank or mlp "
                        "synthesizer")


def train_group(runs: list, device_name: str = "cpu",
                on_step: Callable[[int], None] | None = None) -> list[dict]:
    """Train (or resume) the runs `runs` (rnn_tasks.py's parsed flags, one setting, each
    with its own --seed and --out) side by side in one process; return their summaries.
    `on_step(step)` is called after every step (tests)."""
    check_group(runs)
    first = runs[0]
    device = resolve_device(device_name)
    task = task_of(first)
    members, models, optimizers = [], [], []
    for args in runs:
        checkpoint = load_checkpoint(Path(args.resume), device) if args.resume else None
        torch.manual_seed(args.seed)
        model = build_model(args, task.input_size, task.output_size).to(device)
        optimizer = make_optimizer(model, args)
        if checkpoint is not None:
            flag_lrs = load_model_and_optimizer(checkpoint, model, optimizer)
            for group, lr in zip(optimizer.param_groups, flag_lrs):
                group["lr"] = lr
        members.append(_Member(args, device, checkpoint, task.levels(args.max_length)))
        models.append(model)
        optimizers.append(optimizer)
    steps = {m.state.step for m in members}
    if len(steps) > 1:
        raise UserError(f"runs side by side must start at one step; their checkpoints are at "
                        f"steps {sorted(steps)}")
    for args in runs:                    # only once every run is known to fit
        prepare_out_dir(args.out, "rnn_tasks")
        write_config(Path(args.out), "rnn_tasks.py", args, device)
    stacked = stack_runs(models)
    optimizer = make_optimizer(stacked, first)
    if members[0].state.step > 0:
        optimizer.load_state_dict(stack_optimizer_states([o.state_dict() for o in optimizers]))
        for group, flag in zip(optimizer.param_groups, optimizers[0].param_groups):
            group["lr"] = flag["lr"]
    loop = _GroupLoop(members, stacked, optimizer, task, device, on_step)
    loop.run()
    accuracies = test_accuracy(task, stacked, device, runs=len(members))
    return [write_summary(m.args, m.state, m.curriculum, m.out_dir, device,
                          stacked_runs=len(members),
                          **({} if accuracies is None else {"test_accuracy": accuracies[k]}))
            for k, m in enumerate(members)]
