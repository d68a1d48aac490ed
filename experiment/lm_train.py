"""Character language modelling with truncated BPTT, DNI or DNI+Aux: the training text as
parallel streams cut into windows of T characters, one optimizer step per window, the state
carried from window to window; validation bits per character on a schedule, early stopping on
it, and the test split scored with the best validation model.

Units: a window's loss is the sum over its T steps of the batch-mean cross-entropy (nats), as
`dni.recurrent` expects (a batch-mean loss, B examples); bits per character are the mean
cross-entropy per scored character divided by ln 2.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from experiment.cli import prepare_out_dir, resolve_device
from experiment.data import TextSplits, load_text
from experiment.errors import UserError
from experiment.loop import TrainingLoop
from experiment.records import load_checkpoint, write_config, write_json
from experiment.rnn_train import future_gradient_cosine
from experiment.train import first_nonfinite_gradient
from model import SequenceModel

COLUMNS = ["train_bpc", "valid_bpc", "best_valid_bpc", "sg_loss", "aux_loss",
           "sg_cos"]
EVAL_STREAMS = 8        # validation and test run as this many streams, state carried
COSINE_WINDOWS = 8      # the cosine diagnostic looks this many windows ahead


def bits_per_character(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cross-entropy of `targets` under `logits` (any leading shape, classes last), in
    bits per character."""
    nats = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return nats.item() / math.log(2)


def as_streams(ids: torch.Tensor, streams: int) -> torch.Tensor:
    """A 1-D text of ids as `streams` rows of equal length (the tail that does not fit is
    dropped), each row a contiguous stretch of the text."""
    length = len(ids) // streams
    return ids[:streams * length].view(streams, length)


def one_hot_inputs(window: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, T) character ids -> (T, B, V) one-hot floats, time first as the core takes it."""
    return F.one_hot(window.t(), vocab_size).float()


def window_loss(targets: torch.Tensor) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
    """The chunk loss TruncatedBPTT takes for one window: the sum over the chunk's steps of the
    batch-mean cross-entropy of `targets` (T, B), in nats."""

    def loss(logits: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        chunk = targets[t0:t1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk.reshape(-1),
                               reduction="sum") / chunk.shape[1]

    return loss


@torch.no_grad()
def evaluate_bpc(model: SequenceModel, ids: torch.Tensor, vocab_size: int,
                 streams: int = EVAL_STREAMS, span: int = 512) -> float:
    """Bits per character of a text under the model, read as `streams` streams from a zero
    state, `span` steps at a time with the state carried (every character after each
    stream's first is scored)."""
    was_training = model.training
    model.eval()
    rows = as_streams(ids, max(1, min(streams, len(ids) // 2)))
    core, readout = model.trainer.core, model.trainer.readout
    state, nats, count = None, 0.0, 0
    for t0 in range(0, rows.shape[1] - 1, span):
        window = rows[:, t0:t0 + span + 1]
        output, state = core(one_hot_inputs(window[:, :-1], vocab_size), state)
        targets = window[:, 1:].t()
        logits = readout(output)
        nats += F.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1),
                                reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return nats / count / math.log(2)


def build_model(args, vocab_size: int) -> SequenceModel:
    """The LSTM language model lm.py's flags describe (one-hot characters in, logits out)."""
    return SequenceModel(
        vocab_size, vocab_size, hidden=args.hidden, core="lstm", truncation=args.truncation,
        synthesizer=None if args.method == "bptt" else args.synthesizer,
        synth_hidden=args.synth_hidden, discount=args.discount,
        aux_weight=args.aux_weight if args.method == "dni_aux" else 0.0,
        target_decay=args.target_decay, center=args.center)


def make_optimizer(model: SequenceModel, args) -> torch.optim.Optimizer:
    """Adam: the network at --lr, the synthesizer (if any) at --synth-lr."""
    groups = [{"params": model.network_parameters(), "lr": args.lr}]
    if model.trainer.synthesizer is not None:
        groups.append({"params": list(model.trainer.synthesizer.parameters()),
                       "lr": args.synth_lr})
    return torch.optim.Adam(groups)


@dataclass
class RunState:
    """Where a run stands, besides model, optimizer, carried state and best model."""

    step: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    epoch: int = 0                 # passes over the training text completed
    window: int = 0                # the next window of this epoch
    best_valid_bpc: float = math.inf
    best_step: int = 0
    evals_since_best: int = 0
    sums: dict = field(default_factory=lambda: {"nats": 0.0, "chars": 0, "sg": 0.0,
                                                 "aux": 0.0, "n": 0})


class _LanguageModelLoop(TrainingLoop):
    """lm.py's step: the next window of every stream through truncated BPTT; a period is
    --eval-every steps, ending in a validation, a printed line and a checkpoint."""

    def __init__(self, args, model: SequenceModel, optimizer, text: TextSplits, out_dir: Path,
                 device: torch.device, checkpoint: dict | None,
                 on_step: Callable[[int], None] | None):
        super().__init__(out_dir, model, optimizer,
                         torch.Generator().manual_seed(args.seed), device, RunState(),
                         COLUMNS, checkpoint)
        self.args, self.text, self.on_step = args, text, on_step
        self.streams = as_streams(text.train, args.batch_size).to(device)
        self.windows = (self.streams.shape[1] - 1) // args.truncation
        if self.windows < 1:
            raise UserError(f"--corpus {args.corpus}: the training text is too short for "
                            f"{args.batch_size} streams of windows of {args.truncation + 1}")
        self.valid = text.valid.to(device)
        self.carried = None            # the LSTM state at the streams' position
        self.best_model = copy.deepcopy(model.state_dict())
        self.network = list(model.named_parameters())
        self.clipped = model.network_parameters()
        self.period_start = 0
        if checkpoint is not None:
            self.restore(checkpoint)

    def restore(self, checkpoint: dict) -> list[float]:
        flag_lrs = super().restore(checkpoint)
        for group, lr in zip(self.optimizer.param_groups, flag_lrs):  # flags given now win
            group["lr"] = lr
        self.state = RunState(**checkpoint["state"])
        self.best_model = checkpoint["best_model"]
        carried = checkpoint["carried"]
        self.carried = None if carried is None else tuple(x.to(self.device) for x in carried)
        return flag_lrs

    def snapshot(self) -> dict:
        return {**super().snapshot(), "best_model": self.best_model, "carried": self.carried}

    def finished(self) -> bool:
        state, args = self.state, self.args
        return (state.epoch >= args.epochs or state.evals_since_best >= args.patience
                or (args.steps is not None and state.step >= args.steps))

    def begin_period(self) -> None:
        self.period_start = self.state.step

    def period_over(self) -> bool:
        step = self.state.step
        return self.finished() or (step > self.period_start
                                   and step % self.args.eval_every == 0)

    def progress(self) -> tuple[int, int, str]:
        args, done = self.args, self.state.step - self.period_start
        return args.eval_every, done, f"{args.method} T={args.truncation} epoch {self.state.epoch}"

    def train_step(self) -> None:
        args, state = self.args, self.state
        t0 = state.window * args.truncation
        window = self.streams[:, t0:t0 + args.truncation + 1]
        targets = window[:, 1:].t()
        continues = state.window + 1 < self.windows
        self.optimizer.zero_grad(set_to_none=True)
        report = self.model.trainer(one_hot_inputs(window[:, :-1], self.text.vocab_size),
                                    window_loss(targets), state=self.carried,
                                    continues=continues)
        bad = None
        if not torch.isfinite(report.loss):
            bad = "loss"
        elif report.synthesizer_loss is not None and not torch.isfinite(report.synthesizer_loss):
            bad = "synthetic-gradient loss"
        else:
            bad = first_nonfinite_gradient(self.network)
        if bad:
            raise self.diverged(bad, "lower --lr or --discount")
        if args.clip > 0:
            nn.utils.clip_grad_norm_(self.clipped, args.clip)
        self.optimizer.step()
        sums = state.sums
        sums["nats"] += report.loss.item() * targets.shape[1]
        sums["chars"] += targets.numel()
        if report.synthesizer_loss is not None:
            sums["sg"] += report.synthesizer_loss.item()
        if report.aux_loss is not None:
            sums["aux"] += report.aux_loss.item()
        sums["n"] += 1
        if continues:
            self.carried, state.window = report.state, state.window + 1
        else:                           # the end of the text: the next epoch starts afresh
            self.carried, state.window, state.epoch = None, 0, state.epoch + 1

    def after_step(self) -> None:
        if self.on_step is not None:
            self.on_step(self.state.step)

    def cosine(self) -> float | None:
        """The synthetic gradient's mean cosine to the true (discounted) gradient of the
        future at the window edges of the next COSINE_WINDOWS windows (DNI only)."""
        args, state = self.args, self.state
        if args.method == "bptt":
            return None
        t0 = state.window * args.truncation
        span = self.streams[:, t0:t0 + COSINE_WINDOWS * args.truncation + 1]
        if span.shape[1] < 2 * args.truncation + 1:
            return None
        targets = span[:, 1:].t()
        return future_gradient_cosine(self.model.trainer,
                                      one_hot_inputs(span[:, :-1], self.text.vocab_size),
                                      window_loss(targets), state=self.carried)

    def end_period(self) -> None:
        args, state = self.args, self.state
        valid_bpc = evaluate_bpc(self.model, self.valid, self.text.vocab_size)
        if valid_bpc < state.best_valid_bpc:
            state.best_valid_bpc, state.best_step, state.evals_since_best = \
                valid_bpc, state.step, 0
            self.best_model = copy.deepcopy(self.model.state_dict())
        else:
            state.evals_since_best += 1
        sums, n = state.sums, max(state.sums["n"], 1)
        with_synthesizer = args.method != "bptt"
        row = {"kind": "step", "step": state.step, "wall_seconds": state.wall_seconds,
               "epoch": state.epoch + state.window / self.windows,
               "train_loss": sums["nats"] / max(sums["chars"], 1),
               "train_bpc": sums["nats"] / max(sums["chars"], 1) / math.log(2),
               "valid_bpc": valid_bpc, "best_valid_bpc": state.best_valid_bpc,
               "sg_loss": sums["sg"] / n if with_synthesizer else None,
               "aux_loss": sums["aux"] / n if args.method == "dni_aux" else None,
               "sg_cos": self.cosine()}
        self.log.write(row)
        line = (f"step {state.step:>7}  epoch {row['epoch']:6.2f}  "
                f"train {row['train_bpc']:.3f}  valid {valid_bpc:.3f} bpc  "
                f"(best {state.best_valid_bpc:.3f})")
        if row["sg_loss"] is not None:
            line += f"  sg_loss {row['sg_loss']:.3g}"
        if row["aux_loss"] is not None:
            line += f"  aux_loss {row['aux_loss']:.3g}"
        if row["sg_cos"] is not None:
            line += f"  sg_cos {row['sg_cos']:.3f}"
        tqdm.write(f"{line}  {state.train_seconds:.0f}s", file=sys.stdout)
        sys.stdout.flush()
        state.sums = RunState().sums


def train(args, on_step: Callable[[int], None] | None = None) -> dict:
    """Run (or resume) one language-model run; write its records; return summary.json's."""
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(Path(args.resume), device) if args.resume else None
    text = load_text(args.corpus)
    out_dir = prepare_out_dir(args.out, "lm")
    write_config(out_dir, "lm.py", args, device)
    torch.manual_seed(args.seed)
    model = build_model(args, text.vocab_size).to(device)
    loop = _LanguageModelLoop(args, model, make_optimizer(model, args), text, out_dir, device,
                              checkpoint, on_step)
    loop.run()
    return _write_summary(args, loop, text, out_dir, device)


def _write_summary(args, loop: _LanguageModelLoop, text: TextSplits, out_dir: Path,
                   device: torch.device) -> dict:
    """Score the best validation model on validation and test; write summary.json."""
    state, model = loop.state, loop.model
    final = copy.deepcopy(model.state_dict())
    model.load_state_dict(loop.best_model)
    valid_bpc = evaluate_bpc(model, text.valid.to(device), text.vocab_size)
    test_bpc = evaluate_bpc(model, text.test.to(device), text.vocab_size)
    model.load_state_dict(final)
    stopped = ("early" if state.evals_since_best >= args.patience else
               "epochs" if state.epoch >= args.epochs else "steps")
    summary = {
        "model": args.model, "method": args.method, "truncation": args.truncation,
        "corpus": args.corpus, "valid_bpc": valid_bpc, "test_bpc": test_bpc,
        "best_step": state.best_step, "steps": state.step,
        "epochs": state.epoch + state.window / loop.windows, "stopped_by": stopped,
        "train_seconds": state.train_seconds,
        "steps_per_s": state.step / state.train_seconds if state.train_seconds else math.nan,
        "seed": args.seed, "batch_size": args.batch_size, "hidden": args.hidden,
        "lr": args.lr, "synth_lr": args.synth_lr, "synthesizer": args.synthesizer,
        "discount": args.discount, "center": args.center,
        "target_decay": args.target_decay if args.method != "bptt" else 0.0,
        "aux_weight": args.aux_weight if args.method == "dni_aux" else 0.0,
        "vocab_size": text.vocab_size, "device": str(device), "argv": sys.argv,
    }
    write_json(out_dir / "summary.json", summary)
    print(f"{args.method} T={args.truncation}: test {test_bpc:.4f} bpc, valid {valid_bpc:.4f} "
          f"(best at step {state.best_step} of {state.step}, stopped by {stopped}); "
          f"run records in {out_dir}", flush=True)
    return summary
