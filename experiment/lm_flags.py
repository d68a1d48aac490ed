"""lm.py's flags, without torch: --help and a bad flag are answered before torch loads."""

from __future__ import annotations

from experiment.cli import (
    Parser,
    add_run_arguments,
    add_switch,
    learning_rate,
    nonnegative_float,
    nonnegative_int,
    parse_training_args,
    positive_int,
)

MODELS = ("lstm",)
METHODS = ("bptt", "dni", "dni_aux")
SYNTHESIZERS = ("linear", "mlp", "rnn")   # model.SEQUENCE_SYNTHESIZERS, without torch
FIXED = ("model", "method", "truncation", "corpus", "batch_size", "hidden", "synthesizer",
         "synth_hidden", "seed")


def build_parser() -> Parser:
    """lm.py's flags, each with its default in --help."""
    p = Parser(description="A character language model trained with truncated BPTT, DNI or "
                           "DNI+Aux; reports validation and test bits per character.")
    p.add_argument("--model", choices=MODELS, default="lstm", help="the network")
    p.add_argument("--method", choices=METHODS, default="dni",
                   help="bptt: truncated BPTT; dni: + a synthetic gradient of the future at "
                        "every window's end; dni_aux: + the auxiliary task")
    p.add_argument("--truncation", type=positive_int, default=5,
                   help="T: characters per window; one optimizer step per window")
    p.add_argument("--corpus", default="kjv",
                   help="kjv (the pinned King James Bible) or the path of a UTF-8 text file")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="parallel streams of text, each carrying its state across windows")
    p.add_argument("--hidden", type=positive_int, default=256, help="LSTM units")
    p.add_argument("--lr", type=learning_rate, default=2e-3, help="Adam rate of the network")
    p.add_argument("--synth-lr", type=learning_rate, default=1e-3,
                   help="Adam rate of the synthesizer")
    p.add_argument("--synthesizer", choices=SYNTHESIZERS, default="linear",
                   help="synthesizer on the LSTM state [h, c]")
    p.add_argument("--synth-hidden", type=positive_int, default=256,
                   help="hidden units of the mlp or rnn synthesizer")
    p.add_argument("--discount", type=nonnegative_float, default=0.1,
                   help="lambda: the synthetic future enters each window's end times this")
    p.add_argument("--target-decay", type=nonnegative_float, default=0.9,
                   help="moving-average decay of the synthesizer copy that sends (0: off)")
    add_switch(p, "--center", "send and fit the synthetic gradient minus its batch mean "
               "(off, a stream's cell state drifts without bound)", default=True)
    p.add_argument("--aux-weight", type=nonnegative_float, default=0.1,
                   help="weight of the auxiliary loss (dni_aux only)")
    p.add_argument("--clip", type=nonnegative_float, default=0.0,
                   help="clip the network's gradient norm to this (0: off)")
    p.add_argument("--epochs", type=positive_int, default=20,
                   help="most passes over the training text")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="stop after N optimizer steps (default: no cap)")
    p.add_argument("--eval-every", type=positive_int, default=2000,
                   help="steps between validations (and checkpoints)")
    p.add_argument("--patience", type=positive_int, default=5,
                   help="stop after this many validations without a new best")
    p.add_argument("--threads", type=nonnegative_int, default=0,
                   help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=None, help="run folder (default: runs/lm-<time>)")
    add_run_arguments(p)
    return p


def parse_args(argv: list[str] | None = None):
    """Parse and check the flags (with --resume, the run's saved flags are the defaults)."""
    parser = build_parser()
    args = parse_training_args(parser, argv, script="lm.py", fixed=FIXED)
    if args.target_decay >= 1:
        parser.error("argument --target-decay: must be below 1")
    return args
