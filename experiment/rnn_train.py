"""Training an RNN on a sequence task with truncated BPTT, DNI or DNI+Aux, under the task's
curriculum: flags, the loop (progress bar, a line every --log-every steps, metrics.csv,
periodic atomic checkpoints, SIGINT/SIGTERM -> save and exit, exact --resume) and summary.json.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dni.recurrent import SequenceReport, zero_state
from experiment.cli import (
    Parser,
    add_run_arguments,
    learning_rate,
    nonnegative_float,
    nonnegative_int,
    parse_training_args,
    positive_float,
    positive_int,
    prepare_out_dir,
    refuse_input_window_without_synthesizer,
    resolve_device,
)
from experiment.loop import StepPeriodLoop
from experiment.records import (
    MetricsLog,
    load_checkpoint,
    write_config,
    write_json,
)
from experiment.sequence_tasks import TASKS, Curriculum, SequenceTask, make_task
from experiment.train import first_nonfinite_gradient
from model import RNN_CORES, SEQUENCE_SYNTHESIZERS, SequenceModel

METHODS = ("bptt", "dni", "dni_aux")
UNTRUNCATED = 2**31 - 1   # --truncation 0's chunk: longer than any sequence, so one chunk
# defaults that depend on the task: sequential MNIST (a label at the end only) needs the
# synthesizer to send itself and learn slowly (bench/README.md, "The recurrent settings")
TASK_DEFAULTS = {"synth_lr": (1e-3, {"mnist_rows": 1e-4}),
                 "target_decay": (0.9, {"mnist_rows": 0.0})}
COLUMNS = ["level", "max_length_solved", "errors_per_seq", "sg_loss", "aux_loss", "sg_cos"]


def build_parser() -> Parser:
    """rnn_tasks.py's flags, each with its default in --help."""
    p = Parser(description="Train an RNN on copy / repeat copy / add / argmax with truncated "
                           "BPTT, DNI or DNI+Aux; report the longest sequence solved.")
    p.add_argument("--task", choices=TASKS, default="copy", help="the sequence task")
    p.add_argument("--method", choices=METHODS, default="dni",
                   help="bptt: truncated BPTT; dni: + synthetic gradient at every chunk edge; "
                        "dni_aux: + the auxiliary task")
    p.add_argument("--truncation", type=nonnegative_int, default=3,
                   help="T, the steps of each BPTT chunk (0: untruncated, BPTT through the "
                        "whole sequence; bptt only)")
    p.add_argument("--steps", type=positive_int, default=3000, help="optimizer steps (batches)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="sequences per batch")
    p.add_argument("--hidden", type=positive_int, default=128, help="units of the RNN core")
    p.add_argument("--core", choices=sorted(RNN_CORES), default="lstm", help="the RNN core")
    p.add_argument("--lr", type=learning_rate, default=3e-3, help="Adam learning rate (core)")
    p.add_argument("--synth-lr", type=learning_rate, default=None,
                   help="Adam learning rate of the synthesizer (default: 1e-3; mnist_rows 1e-4)")
    p.add_argument("--synthesizer", choices=SEQUENCE_SYNTHESIZERS, default="linear",
                   help="synthesizer on the flattened state (LSTM: [h, c])")
    p.add_argument("--synth-input-window", type=nonnegative_int, default=0, metavar="K",
                   help="the synthesizer also sees the last K inputs before each chunk edge "
                        "(0: the state alone, as in the paper)")
    p.add_argument("--synth-hidden", type=positive_int, default=256,
                   help="hidden units of the mlp / rnn synthesizer; the rank of lowrank")
    p.add_argument("--discount", "--grad-scale", type=nonnegative_float, default=0.5,
                   help="lambda: the synthetic gradient of the future enters each chunk's end "
                        "(and so its own target) times this (--grad-scale: old name)")
    p.add_argument("--target-decay", type=nonnegative_float, default=None,
                   help="decay of the synthesizer's slow copy that sends the gradient (0: off, "
                        "S sends; default: 0.9; mnist_rows 0)")
    p.add_argument("--aux-weight", type=nonnegative_float, default=0.1,
                   help="weight of the DNI+Aux auxiliary loss (dni_aux only)")
    p.add_argument("--clip", type=nonnegative_float, default=0.0,
                   help="clip the gradient norm of the core and readout (0: off)")
    p.add_argument("--threshold", type=positive_float, default=0.15,
                   help="curriculum: grow the length when errors per sequence fall below this")
    p.add_argument("--window", type=positive_int, default=10,
                   help="curriculum: batches averaged for the threshold")
    p.add_argument("--max-length", type=positive_int, default=64,
                   help="curriculum: the longest length (level) tried")
    p.add_argument("--bits", type=positive_int, default=8, help="copy tasks: bits per vector")
    p.add_argument("--max-repeats", type=positive_int, default=2,
                   help="repeat_copy: repeats drawn from 1..this")
    p.add_argument("--data-dir", default="data",
                   help="mnist_rows: folder holding MNIST/raw (written from the package)")
    p.add_argument("--threads", type=nonnegative_int, default=0,
                   help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=None,
                   help="run folder (default: runs/rnn_tasks-<time>)")
    p.add_argument("--log-every", type=nonnegative_int, default=200,
                   help="print a line and write a metrics.csv row every N steps (0: never)")
    p.add_argument("--checkpoint-every", type=positive_int, default=500,
                   help="save checkpoint.pt every N steps (and at the end and on a signal)")
    add_run_arguments(p)
    return p


def parse_args(argv: list[str] | None = None):
    """Parse and check the flags (with --resume, the run's saved flags are the defaults)."""
    parser = build_parser()
    args = parse_training_args(parser, argv, absent={"target_decay": 0.0, "synth_input_window": 0},
                               script="rnn_tasks.py",
                               renamed={"grad_scale": "discount"},
                               fixed=("task", "method", "truncation", "batch_size", "hidden",
                                      "core", "synthesizer", "synth_input_window",
                                      "synth_hidden", "bits",
                                      "max_repeats", "seed"))
    for dest, (default, by_task) in TASK_DEFAULTS.items():
        # a resumed run keeps what it saved (a synth_lr of None there: the core's rate)
        if getattr(args, dest) is None and not args.resume:
            setattr(args, dest, by_task.get(args.task, default))
    if args.target_decay >= 1:
        parser.error("argument --target-decay: must be below 1")
    refuse_input_window_without_synthesizer(parser, args)
    if args.truncation == 0 and args.method != "bptt":
        parser.error("argument --truncation: 0 (untruncated) has no chunk edge for a synthetic "
                     "gradient; use it with --method bptt")
    if args.task == "argmax" and args.max_length > 512:
        parser.error("argument --max-length: argmax names positions, at most 512")
    return args


def build_model(args: argparse.Namespace, input_size: int, output_size: int) -> SequenceModel:
    """The sequence model rnn_tasks.py's flags describe."""
    return SequenceModel(
        input_size, output_size, hidden=args.hidden, core=args.core,
        truncation=args.truncation or UNTRUNCATED,
        synthesizer=None if args.method == "bptt" else args.synthesizer,
        synth_hidden=args.synth_hidden, discount=args.discount,
        aux_weight=args.aux_weight if args.method == "dni_aux" else 0.0,
        target_decay=args.target_decay, input_window=args.synth_input_window)


def make_optimizer(model: SequenceModel, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Adam: the network at --lr, the synthesizer (if any) at --synth-lr."""
    groups = [{"params": model.network_parameters(), "lr": args.lr}]
    if model.trainer.synthesizer is not None:
        groups.append({"params": list(model.trainer.synthesizer.parameters()),
                       "lr": args.synth_lr or args.lr})
    return torch.optim.Adam(groups)


@dataclass
class RunState:
    """Where a run stands, besides model, optimizer and RNGs."""

    step: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    curriculum: dict = field(default_factory=dict)
    window: dict = field(default_factory=lambda: {"loss": 0.0, "errors": 0.0, "sg": 0.0,
                                                   "aux": 0.0, "n": 0})
    levels: list = field(default_factory=list)     # [step, level] each time the level grew


class SequenceLoop(StepPeriodLoop):
    """rnn_tasks.py's step: a batch of sequences at the curriculum's length through truncated
    BPTT (and its synthesizer); periods of --checkpoint-every steps; a printed line every
    --log-every steps."""

    def __init__(self, args: argparse.Namespace, model: SequenceModel, optimizer, task,
                 out_dir: Path, device, checkpoint: dict | None,
                 on_step: Callable[[int], None] | None):
        super().__init__(out_dir, model, optimizer,
                         torch.Generator(device=device).manual_seed(args.seed), device,
                         RunState(), COLUMNS, checkpoint)
        self.args, self.task, self.on_step = args, task, on_step
        self.curriculum = Curriculum(args.threshold, args.window,
                                     max_level=task.levels(args.max_length))
        self.network = list(model.named_parameters())
        self.clipped = model.network_parameters()
        self.batch, self.period_steps = None, args.checkpoint_every
        if checkpoint is not None:
            self.restore(checkpoint)

    def restore(self, checkpoint: dict) -> list[float]:
        flag_lrs = super().restore(checkpoint)
        for group, lr in zip(self.optimizer.param_groups, flag_lrs):  # flags given now win
            group["lr"] = lr
        self.state = RunState(**checkpoint["state"])
        self.curriculum = Curriculum(**self.state.curriculum)
        self.curriculum.threshold, self.curriculum.window = self.args.threshold, self.args.window
        return flag_lrs

    def snapshot(self) -> dict:
        self.state.curriculum = asdict(self.curriculum)
        return super().snapshot()

    def finished(self) -> bool:
        return self.state.step >= self.args.steps

    def progress(self) -> tuple[int, int, str]:
        args = self.args
        return args.steps, self.state.step, f"{args.task} {args.method} T={args.truncation}"

    def train_step(self) -> None:
        args, state, curriculum = self.args, self.state, self.curriculum
        batch = self.task.sample(curriculum.level, args.batch_size, self.generator, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        report = self.model.trainer(batch.inputs, self.task.loss_of(batch))
        bad = first_nonfinite(report, self.network)
        if bad:
            raise self.diverged(bad, "lower --lr or --discount")
        if args.clip > 0:
            nn.utils.clip_grad_norm_(self.clipped, args.clip)
        self.optimizer.step()
        errors = self.task.errors(report.outputs, batch).item()
        window = state.window
        window["loss"] += report.loss.item()
        window["errors"] += errors
        window["sg"] += report.synthesizer_loss.item() if report.synthesizer_loss is not None \
            else 0.0
        window["aux"] += report.aux_loss.item() if report.aux_loss is not None else 0.0
        window["n"] += 1
        if curriculum.record(errors):
            state.levels.append([state.step + 1, curriculum.level])
        self.batch = batch

    def after_step(self) -> None:
        args, state = self.args, self.state
        if args.log_every > 0 and (state.step % args.log_every == 0 or state.step == args.steps):
            cosine = (future_gradient_cosine(self.model.trainer, self.batch.inputs,
                                             self.task.loss_of(self.batch))
                      if args.method != "bptt" else None)
            log_line(args, state, self.curriculum, self.log, cosine)
        if self.on_step is not None:
            self.on_step(state.step)


def make_loop(args: argparse.Namespace,
              on_step: Callable[[int], None] | None = None) -> SequenceLoop:
    """The loop of one run (a new one, or --resume's), its folder and config.json written."""
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(Path(args.resume), device) if args.resume else None
    out_dir = prepare_out_dir(args.out, "rnn_tasks")
    torch.manual_seed(args.seed)
    task = task_of(args)
    model = build_model(args, task.input_size, task.output_size).to(device)
    loop = SequenceLoop(args, model, make_optimizer(model, args), task, out_dir, device,
                        checkpoint, on_step)
    write_config(out_dir, "rnn_tasks.py", args, device)   # once the checkpoint has loaded
    return loop


def train(args: argparse.Namespace, on_step: Callable[[int], None] | None = None) -> dict:
    """Run (or resume) one training run; write its records; return summary.json's dict."""
    loop = make_loop(args, on_step)
    loop.run()
    return finish(loop)


def finish(loop: SequenceLoop) -> dict:
    """Write a run's summary.json (test accuracy too, where the task has a test set) after its
    loop has run; return its dict."""
    accuracy = test_accuracy(loop.task, loop.model, loop.device)
    extra = {} if accuracy is None else {"test_accuracy": accuracy[0]}
    return write_summary(loop.args, loop.state, loop.curriculum, loop.out_dir, loop.device,
                         **extra)


def task_of(args: argparse.Namespace) -> SequenceTask:
    """The task rnn_tasks.py's flags name."""
    return make_task(args.task, bits=args.bits, max_repeats=args.max_repeats,
                     max_length=args.max_length, data_dir=args.data_dir)


@torch.no_grad()
def test_accuracy(task: SequenceTask, model: nn.Module, device: torch.device, runs: int = 1,
                  batch_size: int = 1000) -> list[float] | None:
    """Each run's accuracy on the task's test set, read whole from a zero state (None: the
    task has no test set); `runs`: the model holds that many runs side by side."""
    if not hasattr(task, "test_batches"):
        return None
    core, readout = model.trainer.core, model.trainer.readout
    correct, total = torch.zeros(runs, device=device), 0
    for batch in task.test_batches(batch_size, device):
        n = batch.inputs.shape[1]
        inputs = batch.inputs.repeat(1, runs, 1)
        outputs, _ = core(inputs, zero_state(core, runs * n, device))
        predicted = readout(outputs[-1]).argmax(-1).view(runs, n)
        correct += (predicted == batch.targets[-1, :, 0].long()).sum(1)
        total += n
    return (correct / total).tolist()


def first_nonfinite(report: SequenceReport, network: list) -> str | None:
    """What a sequence step left non-finite (the loss, any run's; the synthetic-gradient loss;
    else the first named gradient of `network`), None when all is finite."""
    if not torch.isfinite(report.loss).all():
        return "loss"
    if report.synthesizer_loss is not None and not torch.isfinite(report.synthesizer_loss).all():
        return "synthetic-gradient loss"
    return first_nonfinite_gradient(network)


def mean_cosine(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
    """The mean over (synthetic, true) pairs of their cosine, each pair as one vector (None
    without a pair)."""
    if not pairs:
        return None
    return sum(F.cosine_similarity(g.flatten(), t.flatten(), dim=0).item()
               for g, t in pairs) / len(pairs)


def future_gradient_cosine(trainer, inputs: torch.Tensor, chunk_loss,
                           state=None, history: torch.Tensor | None = None,
                           synth_state: tuple | None = None) -> float | None:
    """Cosine between the synthetic and the true (discounted) gradient of the future, the
    batch as one vector, averaged over the chunk edges of this batch (None without an edge);
    `state`: the state the batch starts from (None: zeros); `history` and `synth_state`: the
    inputs before it and a recurrent S's carried state (TruncatedBPTT.forward's)."""
    return mean_cosine(trainer.future_gradients(inputs, chunk_loss, state=state,
                                                history=history, synth_state=synth_state))


def print_step_line(line: str, row: dict, train_seconds: float) -> None:
    """Print `line`, then the row's synthesizer figures that were measured (sg_loss, aux_loss,
    sg_cos), then the training seconds, above the progress bar."""
    if row["sg_loss"] is not None:
        line += f"  sg_loss {row['sg_loss']:.3g}"
    if row["aux_loss"] is not None:
        line += f"  aux_loss {row['aux_loss']:.3g}"
    if row["sg_cos"] is not None:
        line += f"  sg_cos {row['sg_cos']:.3f}"
    tqdm.write(f"{line}  {train_seconds:.0f}s", file=sys.stdout)
    sys.stdout.flush()


def log_line(args: argparse.Namespace, state: RunState, curriculum: Curriculum, log: MetricsLog,
             cosine: float | None = None, prefix: str = "") -> None:
    """One metrics.csv row and one printed line (starting with `prefix`) for the steps since
    the last one; `cosine` is the synthetic gradient's cosine to the true one on the last
    batch."""
    w = state.window
    n = max(w["n"], 1)
    row = {"kind": "step", "step": state.step, "wall_seconds": state.wall_seconds,
           "train_loss": w["loss"] / n, "level": curriculum.level,
           "max_length_solved": curriculum.solved, "errors_per_seq": w["errors"] / n,
           "sg_loss": w["sg"] / n if args.method != "bptt" else None,
           "aux_loss": w["aux"] / n if args.method == "dni_aux" else None,
           "sg_cos": cosine}
    log.write(row)
    unit = "bits/seq" if args.task in ("copy", "repeat_copy") else "errors/seq"
    line = (f"{prefix}step {state.step:>6}/{args.steps}  length {curriculum.level:>3}  "
            f"solved {curriculum.solved:>3}  {unit} {row['errors_per_seq']:.3f}  "
            f"loss {row['train_loss']:.4f}")
    print_step_line(line, row, state.train_seconds)
    state.window = {"loss": 0.0, "errors": 0.0, "sg": 0.0, "aux": 0.0, "n": 0}


def curriculum_stalled(levels: list, steps: int, last_fraction: float = 0.25, *,
                       solved: int = 0, last_level: float = math.inf) -> bool:
    """True when the curriculum could grow no more, having solved its last level (`solved` at
    least `last_level`, the --max-length), or its level was flat over the last `last_fraction`
    of `steps`: no growth in `levels` ([step, level] each time the level grew) after that point."""
    if solved >= last_level:
        return True
    start = steps - last_fraction * steps
    return all(step <= start for step, _ in levels)


def write_summary(args: argparse.Namespace, state: RunState, curriculum: Curriculum,
                  out_dir: Path, device, **extra) -> dict:
    """summary.json of the finished run (with `extra` keys, e.g. how many runs shared its
    process)."""
    summary = {
        "task": args.task, "method": args.method, "truncation": args.truncation,
        "max_length_solved": curriculum.solved, "steps": state.step,
        "train_seconds": state.train_seconds, "final_length": curriculum.level,
        "steps_per_s": state.step / state.train_seconds if state.train_seconds else math.nan,
        "levels": state.levels,
        "stalled": curriculum_stalled(state.levels, state.step, solved=curriculum.solved,
                                      last_level=curriculum.level),
        "seed": args.seed, "batch_size": args.batch_size,
        "hidden": args.hidden, "core": args.core, "lr": args.lr, "synth_lr": args.synth_lr,
        "synthesizer": args.synthesizer, "discount": args.discount,
        "target_decay": args.target_decay if args.method != "bptt" else 0.0,
        "aux_weight": args.aux_weight, "device": str(device), "argv": sys.argv, **extra,
    }
    write_json(out_dir / "summary.json", summary)
    scored = (f"test accuracy {100 * extra['test_accuracy']:.2f}%" if "test_accuracy" in extra
              else f"longest length solved {curriculum.solved}")
    print(f"{args.task} {args.method} T={args.truncation}: {scored} in {state.step} steps "
          f"({state.train_seconds:.1f}s); run records in {out_dir}", flush=True)
    return summary
