"""Character language modelling: an LSTM trained with truncated BPTT, DNI or DNI+Aux (the
training text as parallel streams cut into windows of T characters, one optimizer step per
window, the state carried from window to window), or a GPT trained with backprop or DNI at
cuts between its blocks, or with the blocks up to the top cut frozen as the control (a batch
of random windows of --context characters per step).
Validation bits per character on a schedule, early stopping on it, and the test split scored
with the best validation model. One loop (`_LanguageModelLoop`) holds what both share; each
model's step, scoring and diagnostic are its subclass's.

Units: an LSTM window's loss is the sum over its T steps of the batch-mean cross-entropy
(nats), as `dni.recurrent` expects (a batch-mean loss, B examples). A GPT step's loss is the
mean cross-entropy over all B T predicted characters, so `DNI` counts the positions into the
batch (dni.interface.examples_in). Bits per character are the mean cross-entropy per scored
character divided by ln 2.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from experiment.cli import prepare_out_dir, resolve_device
from experiment.data import TextSplits, load_text
from experiment.errors import UserError
from experiment.loop import StepPeriodLoop
from experiment.records import load_checkpoint, peak_memory_mb, write_config, write_json
from experiment.rnn_train import future_gradient_cosine, print_step_line
from experiment.train import adam, first_nonfinite_gradient
from model import GPT, SequenceModel

COLUMNS = ["train_seconds", "train_bpc", "valid_bpc", "best_valid_bpc", "sg_loss",
           "aux_loss", "sg_cos"]
EVAL_STREAMS = 8        # validation and test run as this many streams, state carried
COSINE_WINDOWS = 8      # the cosine diagnostic looks this many windows ahead


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


def build_model(args: argparse.Namespace, vocab_size: int) -> SequenceModel:
    """The LSTM language model lm.py's flags describe (one-hot characters in, logits out)."""
    return SequenceModel(
        vocab_size, vocab_size, hidden=args.hidden, core="lstm", truncation=args.truncation,
        synthesizer=None if args.method == "bptt" else args.synthesizer,
        synth_hidden=args.synth_hidden, discount=args.discount,
        aux_weight=args.aux_weight if args.method == "dni_aux" else 0.0,
        target_decay=args.target_decay, center=args.center,
        input_window=args.synth_input_window)


def make_optimizer(model: SequenceModel, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Adam: the network at --lr, the synthesizer (if any) at --synth-lr."""
    groups = [{"params": model.network_parameters(), "lr": args.lr}]
    if model.trainer.synthesizer is not None:
        groups.append({"params": list(model.trainer.synthesizer.parameters()),
                       "lr": args.synth_lr})
    return adam(groups, lr=args.lr)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The GPT's loss: the mean cross-entropy over every predicted character of the batch
    (B T of them), in nats."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


UNSCORED = -100   # a padded position's target: cross_entropy's ignore_index
GPT_EVAL_BATCH = 64   # windows per evaluation batch


def gpt_eval_batches(ids: torch.Tensor, context: int, batch_size: int = GPT_EVAL_BATCH):
    """A text as consecutive windows of `context` characters, `batch_size` at a time: (inputs,
    targets) pairs of shape (n, context). The tail is padded to a whole window; its padded
    positions have the target UNSCORED (a causal model's earlier positions never see them)."""
    inputs, targets = ids[:-1], ids[1:]
    windows = -(-len(inputs) // context)
    pad = windows * context - len(inputs)
    inputs = F.pad(inputs, (0, pad)).view(windows, context)
    targets = F.pad(targets, (0, pad), value=UNSCORED).view(windows, context)
    for start in range(0, windows, batch_size):
        yield inputs[start:start + batch_size], targets[start:start + batch_size]


def scored_nats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """The summed cross-entropy (nats) of the scored targets, and how many there are."""
    nats = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction="sum", ignore_index=UNSCORED).item()
    return nats, int((targets != UNSCORED).sum())


def random_windows(ids: torch.Tensor, batch_size: int, context: int,
                   generator: torch.Generator) -> torch.Tensor:
    """`batch_size` windows of `context` + 1 consecutive ids of a 1-D text, (B, context + 1),
    their starts drawn at random from `generator` (a CPU generator; the text on any device)."""
    starts = torch.randint(0, len(ids) - context, (batch_size,), generator=generator)
    return ids[(starts[:, None] + torch.arange(context + 1)).to(ids.device)]


@torch.no_grad()
def evaluate_gpt_bpc(model: nn.Module, ids: torch.Tensor, context: int,
                     batch_size: int = GPT_EVAL_BATCH) -> float:
    """Bits per character of a text under a GPT, read as consecutive windows of `context`
    characters, each from no context (every character after the text's first is scored)."""
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    for x, y in gpt_eval_batches(ids, context, batch_size):
        batch_nats, scored = scored_nats(model(x), y)
        nats, count = nats + batch_nats, count + scored
    model.train(was_training)
    return nats / count / math.log(2)


def gpt_synthesizer_options(args: argparse.Namespace) -> dict:
    """What lm.py's flags give the synthesizer at each GPT cut (dni.synthesizer_factory)."""
    if args.synthesizer == "mlp":
        return {"hidden_size": args.synth_hidden, "num_layers": 2}
    if args.synthesizer == "sequence_conv":
        return {"hidden_size": args.synth_hidden}
    return {}


def build_gpt(args: argparse.Namespace, vocab_size: int,
              device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The GPT lm.py's flags describe and its Adam; under dni, wrapped as `DNI(gpt,
    optim=opt, blocks=cuts)` (the synthesizers a group of the same Adam at --synth-lr, the
    blocks up to the top cut a group at --lower-lr times --lr when that is not 1), cDNI's
    context each position's target character; under frozen, the embedding and the blocks up to
    the top cut never train (no gradient, not in the optimizer)."""
    from dni import DNI

    net = GPT(vocab_size, width=args.width, layers=args.layers, heads=args.heads,
              context=args.context).to(device)
    if args.method == "bp":
        return net, adam(net.parameters(), lr=args.lr)
    lower = list(net[:max(args.cuts) + 1].parameters())   # the embedding up to the top cut
    if args.method == "frozen":
        for p in lower:
            p.requires_grad_(False)
        return net, adam([p for p in net.parameters() if p.requires_grad], lr=args.lr)
    if args.lower_lr == 1.0:
        optimizer = adam(net.parameters(), lr=args.lr)
    else:   # two groups only when asked, so runs without the flag resume as before
        below = {id(p) for p in lower}
        upper = [p for p in net.parameters() if id(p) not in below]
        optimizer = adam([{"params": lower, "lr": args.lr * args.lower_lr},
                          {"params": upper, "lr": args.lr}], lr=args.lr)
    model = DNI(net, optim=optimizer, synthesizer=args.synthesizer,
                blocks=[str(cut) for cut in args.cuts],
                context_size=vocab_size if args.conditioned else 0,
                synthesizer_lr=args.synth_lr,
                example_input=torch.zeros(1, args.context, dtype=torch.int64, device=device),
                **gpt_synthesizer_options(args))
    return model, optimizer


@dataclass
class RunState:
    """Where a run stands, besides model, optimizer, carried state and best model."""

    step: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    epoch: int = 0                 # lstm: passes over the training text completed
    window: int = 0                # lstm: the next window of this epoch
    best_valid_bpc: float = math.inf
    best_step: int = 0
    evals_since_best: int = 0
    sums: dict = field(default_factory=lambda: {"nats": 0.0, "chars": 0, "sg": 0.0,
                                                 "aux": 0.0, "n": 0})


class _LanguageModelLoop(StepPeriodLoop):
    """lm.py's loop, whatever the model: a period is --eval-every steps, ending in a
    validation, a printed line and a checkpoint; early stopping on validation. A subclass
    gives the step, the scoring of a text, the synthetic gradient's cosine and the epochs
    done."""

    def __init__(self, args: argparse.Namespace, model: nn.Module, optimizer, text: TextSplits,
                 out_dir: Path, device: torch.device, checkpoint: dict | None,
                 on_step: Callable[[int], None] | None, clipped: list[nn.Parameter]):
        super().__init__(out_dir, model, optimizer,
                         torch.Generator().manual_seed(args.seed), device, RunState(),
                         COLUMNS, checkpoint)
        self.args, self.text, self.on_step = args, text, on_step
        self.valid = text.valid[:args.eval_chars or None].to(device)   # 0: the whole split
        self.best_model = self.model_state()
        self.checked = list(model.named_parameters())
        self.clipped = clipped         # the network's parameters, not the synthesizers'
        self.period_steps = args.eval_every

    # what each model defines
    def evaluate(self, ids: torch.Tensor) -> float:
        """Bits per character of a text (1-D ids on the device) under the model."""
        raise NotImplementedError

    def cosine(self) -> float | None:
        """The synthetic gradient's cosine to the true one, on a fixed probe (None: no DNI)."""
        raise NotImplementedError

    def epochs_done(self) -> float:
        """Passes over the training text so far."""
        raise NotImplementedError

    def model_state(self) -> dict:
        """A copy of what evaluation needs of the model (the best one is kept)."""
        return copy.deepcopy(self.model.state_dict())

    def load_model_state(self, state: dict) -> None:
        """Load a `model_state()`."""
        self.model.load_state_dict(state)

    # shared
    def restore(self, checkpoint: dict) -> list[float]:
        flag_lrs = super().restore(checkpoint)
        for group, lr in zip(self.optimizer.param_groups, flag_lrs):  # flags given now win
            group["lr"] = lr
        self.state = RunState(**checkpoint["state"])
        self.best_model = checkpoint["best_model"]
        return flag_lrs

    def snapshot(self) -> dict:
        return {**super().snapshot(), "best_model": self.best_model}

    def finished(self) -> bool:
        state, args = self.state, self.args
        return (self.epochs_done() >= args.epochs or state.evals_since_best >= args.patience
                or (args.steps is not None and state.step >= args.steps))

    def progress(self) -> tuple[int, int, str]:
        done = self.state.step - self.period_start
        return self.args.eval_every, done, f"{describe(self.args)} epoch {int(self.epochs_done())}"

    def check_and_step(self, loss: torch.Tensor, synthesizer_loss: torch.Tensor | None,
                       advice: str) -> None:
        """Refuse a non-finite loss or gradient (one line), clip, and step the optimizer."""
        bad = None
        if not torch.isfinite(loss):
            bad = "loss"
        elif synthesizer_loss is not None and not torch.isfinite(synthesizer_loss):
            bad = "synthetic-gradient loss"
        else:
            bad = first_nonfinite_gradient(self.checked)
        if bad:
            raise self.diverged(bad, advice)
        if self.args.clip > 0:
            nn.utils.clip_grad_norm_(self.clipped, self.args.clip)
        self.optimizer.step()

    def add_to_sums(self, nats: float, chars: int, synthesizer_loss: torch.Tensor | None,
                    aux_loss: torch.Tensor | None) -> None:
        """Count one step into the period's training means."""
        sums = self.state.sums
        sums["nats"] += nats
        sums["chars"] += chars
        if synthesizer_loss is not None:
            sums["sg"] += synthesizer_loss.item()
        if aux_loss is not None:
            sums["aux"] += aux_loss.item()
        sums["n"] += 1

    def after_step(self) -> None:
        if self.on_step is not None:
            self.on_step(self.state.step)

    def end_period(self) -> None:
        args, state = self.args, self.state
        valid_bpc = self.evaluate(self.valid)
        if valid_bpc < state.best_valid_bpc:
            state.best_valid_bpc, state.best_step, state.evals_since_best = \
                valid_bpc, state.step, 0
            self.best_model = self.model_state()
        else:
            state.evals_since_best += 1
        sums, n = state.sums, max(state.sums["n"], 1)
        row = {"kind": "step", "step": state.step, "wall_seconds": state.wall_seconds,
               "train_seconds": state.train_seconds,
               "epoch": self.epochs_done(),
               "train_loss": sums["nats"] / max(sums["chars"], 1),
               "train_bpc": sums["nats"] / max(sums["chars"], 1) / math.log(2),
               "valid_bpc": valid_bpc, "best_valid_bpc": state.best_valid_bpc,
               "sg_loss": (sums["sg"] / max(sums.get("sg_n", n), 1)
                           if uses_synthesizer(args) else None),
               "aux_loss": sums["aux"] / n if args.method == "dni_aux" else None,
               "sg_cos": self.cosine()}
        state.sums = RunState().sums
        if self.log is None:    # a pipeline stage that keeps no records
            return
        self.log.write(row)
        line = (f"step {state.step:>7}  epoch {row['epoch']:6.2f}  "
                f"train {row['train_bpc']:.3f}  valid {valid_bpc:.3f} bpc  "
                f"(best {state.best_valid_bpc:.3f})")
        print_step_line(line, row, state.train_seconds)


class _RecurrentLoop(_LanguageModelLoop):
    """The LSTM's step: the next window of every stream through truncated BPTT, the state
    carried to the next."""

    def __init__(self, args: argparse.Namespace, model: SequenceModel, optimizer, text: TextSplits,
                 out_dir: Path, device: torch.device, checkpoint: dict | None,
                 on_step: Callable[[int], None] | None):
        super().__init__(args, model, optimizer, text, out_dir, device, checkpoint, on_step,
                         model.network_parameters())
        self.streams = as_streams(text.train, args.batch_size).to(device)
        self.windows = (self.streams.shape[1] - 1) // args.truncation
        if self.windows < 1:
            raise UserError(f"--corpus {args.corpus}: the training text is too short for "
                            f"{args.batch_size} streams of windows of {args.truncation + 1}")
        self.carried = None            # the LSTM state at the streams' position
        self.synth_carried = None      # a recurrent synthesizer's (TruncatedBPTT's synth_state)
        if checkpoint is not None:
            self.restore(checkpoint)

    def restore(self, checkpoint: dict) -> list[float]:
        flag_lrs = super().restore(checkpoint)
        # load_checkpoint has already mapped the saved states onto the device
        self.carried = checkpoint["carried"]
        self.synth_carried = checkpoint.get("synth_carried")
        return flag_lrs

    def snapshot(self) -> dict:
        return {**super().snapshot(), "carried": self.carried,
                "synth_carried": self.synth_carried}

    def epochs_done(self) -> float:
        return self.state.epoch + self.state.window / self.windows

    def evaluate(self, ids: torch.Tensor) -> float:
        return evaluate_bpc(self.model, ids, self.text.vocab_size)

    def train_step(self) -> None:
        args, state = self.args, self.state
        t0 = state.window * args.truncation
        window = self.streams[:, t0:t0 + args.truncation + 1]
        targets = window[:, 1:].t()
        continues = state.window + 1 < self.windows
        self.optimizer.zero_grad(set_to_none=True)
        report = self.model.trainer(one_hot_inputs(window[:, :-1], self.text.vocab_size),
                                    window_loss(targets), state=self.carried,
                                    continues=continues, history=self.history(t0),
                                    synth_state=self.synth_carried)
        self.check_and_step(report.loss, report.synthesizer_loss, "lower --lr or --discount")
        self.add_to_sums(report.loss.item() * targets.shape[1], targets.numel(),
                         report.synthesizer_loss, report.aux_loss)
        if continues:
            self.carried, state.window = report.state, state.window + 1
            self.synth_carried = report.synth_state
        else:                           # the end of the text: the next epoch starts afresh
            self.carried, state.window, state.epoch = None, 0, state.epoch + 1
            self.synth_carried = None

    def history(self, t0: int) -> torch.Tensor | None:
        """The --synth-input-window characters before position t0 of the streams, one-hot
        (None without a window, or at the streams' start, where the state is zeros too)."""
        window = self.args.synth_input_window
        if not window or t0 == 0:
            return None
        return one_hot_inputs(self.streams[:, max(0, t0 - window):t0], self.text.vocab_size)

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
                                      window_loss(targets), state=self.carried,
                                      history=self.history(t0), synth_state=self.synth_carried)


class _TransformerLoop(_LanguageModelLoop):
    """The GPT's step: a batch of --batch-size random windows of --context + 1 characters of
    the training text (drawn from the loop's generator), one Adam step on the mean
    cross-entropy of all their next characters; under dni, each cut's block learns from its
    synthetic gradient during the forward pass."""

    def __init__(self, args: argparse.Namespace, model: nn.Module, optimizer, text: TextSplits,
                 out_dir: Path, device: torch.device, checkpoint: dict | None,
                 on_step: Callable[[int], None] | None, clipped: list[nn.Parameter] | None = None):
        if clipped is None:
            clipped = list((model.net if uses_synthesizer(args) else model).parameters())
        super().__init__(args, model, optimizer, text, out_dir, device, checkpoint, on_step,
                         clipped)
        self.train_ids = text.train.to(device)
        if len(self.train_ids) < args.context + 2:
            raise UserError(f"--corpus {args.corpus}: the training text is shorter than one "
                            f"window of --context {args.context} + 1 characters")
        # the cosine's probe: fixed windows, drawn apart from training's random stream
        self.probe = self.draw_windows(torch.Generator().manual_seed(args.seed + 1))
        if checkpoint is not None:
            self.restore(checkpoint)

    def draw_windows(self, generator: torch.Generator) -> torch.Tensor:
        """--batch-size random windows of --context + 1 training characters, (B, context + 1)."""
        return random_windows(self.train_ids, self.args.batch_size, self.args.context,
                              generator)

    def epochs_done(self) -> float:
        args = self.args
        return self.state.step * args.batch_size * args.context / len(self.train_ids)

    def evaluate(self, ids: torch.Tensor) -> float:
        return evaluate_gpt_bpc(self.model, ids, self.args.context)

    def train_step(self) -> None:
        windows = self.draw_windows(self.generator)
        inputs, targets = windows[:, :-1], windows[:, 1:]
        self.optimizer.zero_grad(set_to_none=True)
        conditioned = uses_synthesizer(self.args) and self.args.conditioned
        logits = self.model(inputs, context=targets) if conditioned else self.model(inputs)
        loss = token_loss(logits, targets)
        loss.backward()
        synthesizer_loss = None
        if uses_synthesizer(self.args):
            synthesizer_loss = torch.stack([i.last_loss for i in self.model.interfaces]).mean()
        self.check_and_step(loss, synthesizer_loss, "lower --lr or --synth-lr")
        self.add_to_sums(loss.item() * targets.numel(), targets.numel(), synthesizer_loss,
                         None)

    def cosine(self) -> float | None:
        """The synthetic gradient's cosine to the true dL/dh at the cuts (mean over them), on
        a fixed probe batch of training windows (DNI only)."""
        args = self.args
        if not uses_synthesizer(args):
            return None
        inputs, targets = self.probe[:, :-1], self.probe[:, 1:]
        cosines = self.model.gradient_cosines(token_loss, inputs, targets,
                                              context=targets if args.conditioned else None)
        return sum(cosines) / len(cosines)


def uses_synthesizer(args: argparse.Namespace) -> bool:
    """Whether lm.py's flags train with synthetic gradients."""
    return args.method not in ("bptt", "bp", "frozen")


def describe(args: argparse.Namespace) -> str:
    """A run in a few words: the method and the LSTM's T, or the GPT's method."""
    if args.model == "lstm":
        window = f" S sees {args.synth_input_window}" if args.synth_input_window else ""
        return f"{args.method} T={args.truncation}{window}"
    return f"gpt {'cdni' if uses_synthesizer(args) and args.conditioned else args.method}"


def make_loop(args: argparse.Namespace, text: TextSplits, out_dir: Path, device: torch.device,
              checkpoint: dict | None = None,
              on_step: Callable[[int], None] | None = None) -> _LanguageModelLoop:
    """The seeded model, its optimizer and the training loop of one run (nothing written
    until the loop runs)."""
    torch.manual_seed(args.seed)
    if args.model == "lstm":
        model = build_model(args, text.vocab_size).to(device)
        return _RecurrentLoop(args, model, make_optimizer(model, args), text, out_dir, device,
                              checkpoint, on_step)
    model, optimizer = build_gpt(args, text.vocab_size, device)
    return _TransformerLoop(args, model, optimizer, text, out_dir, device, checkpoint, on_step)


def train(args: argparse.Namespace, on_step: Callable[[int], None] | None = None) -> dict:
    """Run (or resume) one language-model run in this process; write its records; return
    summary.json's (under torchrun, lm.py runs experiment.lm_pipeline instead)."""
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(Path(args.resume), device) if args.resume else None
    text = load_text(args.corpus)
    out_dir = prepare_out_dir(args.out, "lm")
    write_config(out_dir, "lm.py", args, device)
    loop = make_loop(args, text, out_dir, device, checkpoint, on_step)
    loop.run()
    return write_summary(args, loop, text, out_dir, device)


def write_summary(args: argparse.Namespace, loop: _LanguageModelLoop, text: TextSplits,
                  out_dir: Path, device: torch.device, extra: dict | None = None,
                  writes: bool = True) -> dict | None:
    """Score the best validation model on validation and test; write summary.json (with
    `extra` keys) and print the run's line, unless `writes` is False (a pipeline stage that
    keeps no records: it only takes part in the scoring)."""
    state = loop.state
    final = loop.model_state()
    loop.load_model_state(loop.best_model)
    valid_bpc = loop.evaluate(text.valid.to(device))
    test_bpc = loop.evaluate(text.test.to(device))
    loop.load_model_state(final)
    if not writes:
        return None
    stopped = ("early" if state.evals_since_best >= args.patience else
               "epochs" if loop.epochs_done() >= args.epochs else "steps")
    synthetic = uses_synthesizer(args)
    summary = {
        "model": args.model, "method": args.method, "corpus": args.corpus,
        "valid_bpc": valid_bpc, "test_bpc": test_bpc,
        "best_step": state.best_step, "steps": state.step,
        "epochs": loop.epochs_done(), "stopped_by": stopped,
        "train_seconds": state.train_seconds,
        "steps_per_s": state.step / state.train_seconds if state.train_seconds else math.nan,
        "seed": args.seed, "batch_size": args.batch_size,
        "lr": args.lr, "synth_lr": args.synth_lr, "synthesizer": args.synthesizer,
    }
    if args.model == "lstm":
        summary.update({
            "truncation": args.truncation, "hidden": args.hidden,
            "discount": args.discount, "center": args.center,
            "target_decay": args.target_decay if synthetic else 0.0,
            "aux_weight": args.aux_weight if args.method == "dni_aux" else 0.0})
    else:
        summary.update({
            "context": args.context, "width": args.width, "layers": args.layers,
            "heads": args.heads,
            "cuts": args.cuts if synthetic or args.method == "frozen" else [],
            "conditioned": bool(synthetic and args.conditioned),
            "lower_lr": args.lower_lr if synthetic else 1.0})
    summary.update({"vocab_size": text.vocab_size, "device": str(device), "argv": sys.argv,
                    "peak_memory_mb": peak_memory_mb(device), **(extra or {})})
    write_json(out_dir / "summary.json", summary)
    print(f"{describe(args)}: test {test_bpc:.4f} bpc, valid {valid_bpc:.4f} "
          f"(best at step {state.best_step} of {state.step}, stopped by {stopped}); "
          f"run records in {out_dir}", flush=True)
    return summary
