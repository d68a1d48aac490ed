"""lm.py's flags, without torch: --help and a bad flag are answered before torch loads."""

from __future__ import annotations

from experiment.cli import (
    PIPELINE_LINK_FLAGS,
    Parser,
    add_pipeline_link_arguments,
    add_run_arguments,
    boolean,
    learning_rate,
    nonnegative_float,
    nonnegative_int,
    parse_training_args,
    positive_float,
    positive_int,
    refuse_input_window_without_synthesizer,
    refuse_pipeline_flags,
)
from experiment.records import world_size_from_env

MODELS = ("lstm", "gpt")
METHODS = ("bptt", "dni", "dni_aux")     # the LSTM's
GPT_METHODS = ("bp", "dni", "frozen")
METHODS_OF = {"lstm": METHODS, "gpt": GPT_METHODS}
SYNTHESIZERS = ("linear", "lowrank", "mlp", "rnn")   # model.SEQUENCE_SYNTHESIZERS, without torch
GPT_SYNTHESIZERS = ("linear", "mlp", "sequence_conv", "loss_gradient")   # in dni.SYNTHESIZERS
# each model's own flags and their defaults: the other model's are refused, so a flag given is
# never silently ignored (their argparse default is None, resolved in parse_args)
MODEL_FLAGS = {
    "lstm": {"truncation": 5, "hidden": 256, "discount": 0.1, "target_decay": 0.9,
             "center": True, "aux_weight": 0.1, "synth_input_window": 0},
    "gpt": {"context": 64, "width": 128, "layers": 4, "heads": 4, "cuts": None,
            "conditioned": False, "lower_lr": 1.0},
}
LEARNING_RATES = {"lstm": 2e-3, "gpt": 1e-3}
# the LSTM's synthesizer at 1e-3 ran away in 2 of 10 runs of the 6,000-step table; at 3e-4 in
# none of 30, and DNI beat BPTT at every T (docs/results.md; before 2026-12-06 it was 1e-3)
SYNTH_LEARNING_RATES = {"lstm": 3e-4, "gpt": 1e-3}
FIXED = ("model", "method", "truncation", "corpus", "batch_size", "hidden", "synthesizer",
         "synth_hidden", "seed", "context", "width", "layers", "heads", "cuts", "conditioned",
         "staleness", "synth_input_window")


def even_cuts(layers: int, stages: int = 2) -> list[int]:
    """The children after which `stages` pipeline stages of a GPT with `layers` blocks meet
    (0: the embedding), its layers + 2 children (embedding, blocks, head) spread as evenly as
    they divide."""
    return [round(k * (layers + 2) / stages) - 1 for k in range(1, stages)]


def build_parser() -> Parser:
    """lm.py's flags, each with its default in --help."""
    p = Parser(description="A character language model, an LSTM trained with truncated BPTT, "
                           "DNI or DNI+Aux, or a GPT trained with backprop or DNI at cuts "
                           "between its blocks (or frozen up to the top cut, the control); "
                           "reports validation and test bits per "
                           "character.")
    p.add_argument("--model", choices=MODELS, default="lstm", help="the network")
    p.add_argument("--method", choices=sorted({*METHODS, *GPT_METHODS}),
                   default="dni",
                   help="lstm: bptt, dni (a synthetic future at each window's end) or dni_aux "
                        "(+ an auxiliary task); gpt: bp, dni or frozen (at --cuts)")
    p.add_argument("--corpus", default="kjv",
                   help="kjv (the pinned King James Bible) or the path of a UTF-8 text file")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="lstm: parallel streams of text, each carrying its state across "
                        "windows; gpt: random windows of --context characters")
    p.add_argument("--lr", type=learning_rate, default=None,
                   help="Adam rate of the network (default: 2e-3 lstm, 1e-3 gpt)")
    p.add_argument("--synth-lr", type=learning_rate, default=None,
                   help="Adam rate of the synthesizer (default: 3e-4 lstm, 1e-3 gpt)")
    p.add_argument("--synthesizer", choices=sorted({*SYNTHESIZERS, *GPT_SYNTHESIZERS}),
                   default="linear",
                   help="lstm: on the state [h, c]; gpt: per position (linear, mlp, "
                        "loss_gradient: cDNI only) or along the sequence (sequence_conv)")
    p.add_argument("--synth-hidden", type=positive_int, default=256,
                   help="hidden units of the mlp, rnn or sequence_conv synthesizer; the rank "
                        "of lowrank (lstm)")
    lstm = p.add_argument_group("lstm only")
    lstm.add_argument("--truncation", type=positive_int, default=None,
                      help="T: characters per window; one optimizer step per window "
                           "(default: 5)")
    lstm.add_argument("--hidden", type=positive_int, default=None,
                      help="LSTM units (default: 256)")
    lstm.add_argument("--discount", type=nonnegative_float, default=None,
                      help="lambda: the synthetic future enters each window's end times this "
                           "(default: 0.1)")
    lstm.add_argument("--target-decay", type=nonnegative_float, default=None,
                      help="moving-average decay of the synthesizer copy that sends (0: off) "
                           "(default: 0.9)")
    lstm.add_argument("--center", type=boolean, nargs="?", const=True, default=None,
                      help="send and fit the synthetic gradient minus its batch mean "
                           "(default: True)")
    lstm.add_argument("--aux-weight", type=nonnegative_float, default=None,
                      help="weight of the auxiliary loss, dni_aux only (default: 0.1)")
    lstm.add_argument("--synth-input-window", type=nonnegative_int, default=None, metavar="K",
                      help="dni, dni_aux: the synthesizer also sees the K characters before "
                           "each window edge (default: 0, the state alone, as in the paper)")
    gpt = p.add_argument_group("gpt only")
    gpt.add_argument("--context", type=positive_int, default=None,
                     help="characters per window, the longest the model reads (default: 64)")
    gpt.add_argument("--width", type=positive_int, default=None,
                     help="d: features per position (default: 128)")
    gpt.add_argument("--layers", type=positive_int, default=None,
                     help="transformer blocks (default: 4)")
    gpt.add_argument("--heads", type=positive_int, default=None,
                     help="attention heads per block (default: 4)")
    gpt.add_argument("--cuts", type=nonnegative_int, nargs="+", default=None,
                     help="dni: interfaces after these blocks (0: the embedding); frozen: "
                          "up to the highest; torchrun: stage edges (default: even)")
    gpt.add_argument("--conditioned", type=boolean, nargs="?", const=True, default=None,
                     help="dni: cDNI, each position's target character as the synthesizer's "
                          "context (True/False/1/0, or the flag alone; default: False)")
    gpt.add_argument("--lower-lr", type=positive_float, default=None,
                     help="dni: the rate of the embedding and the blocks up to the top cut "
                          "(those that learn from synthetic gradients), as a multiple of "
                          "--lr (default: 1.0)")
    add_pipeline_link_arguments(gpt)
    p.add_argument("--clip", type=nonnegative_float, default=0.0,
                   help="clip the network's gradient norm to this (0: off)")
    p.add_argument("--epochs", type=positive_int, default=20,
                   help="most passes over the training text")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="stop after N optimizer steps (default: no cap)")
    p.add_argument("--eval-every", type=positive_int, default=2000,
                   help="steps between validations (and checkpoints)")
    p.add_argument("--eval-chars", type=nonnegative_int, default=0,
                   help="validate on the first N characters of the validation split (0: all of "
                        "it); the summary scores all of it (default: 0)")
    p.add_argument("--patience", type=positive_int, default=5,
                   help="stop after this many validations without a new best")
    p.add_argument("--threads", type=nonnegative_int, default=0,
                   help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=None, help="run folder (default: runs/lm-<time>)")
    add_run_arguments(p)
    return p


def flags_added_since(saved: dict) -> dict:
    """What a run saved before a flag existed ran with: an LSTM's S saw no characters."""
    return {"synth_input_window": 0 if saved.get("model", "lstm") == "lstm" else None}


def parse_args(argv: list[str] | None = None):
    """Parse and check the flags (with --resume, the run's saved flags are the defaults)."""
    parser = build_parser()
    args = parse_training_args(parser, argv, flags_added_since, script="lm.py", fixed=FIXED)
    refuse_pipeline_flags(parser, PIPELINE_LINK_FLAGS, argv)
    model, stages = args.model, world_size_from_env()
    if stages > 1 and (model != "gpt" or args.method == "bp"):
        parser.error("under torchrun lm.py runs --model gpt as a pipeline, --method dni or "
                     "frozen (bp runs in one process)")
    if stages > 1 and args.clip:
        parser.error("argument --clip: not in a pipeline (each stage steps on its own)")
    if args.method not in METHODS_OF[model]:
        parser.error(f"argument --method: {args.method} is not a method of --model {model} "
                     f"(choose from {', '.join(METHODS_OF[model])})")
    synthesizers = SYNTHESIZERS if model == "lstm" else GPT_SYNTHESIZERS
    if args.synthesizer not in synthesizers:
        parser.error(f"argument --synthesizer: {args.synthesizer} is not a synthesizer of "
                     f"--model {model} (choose from {', '.join(synthesizers)})")
    for other, flags in MODEL_FLAGS.items():
        for dest, default in flags.items():
            given = getattr(args, dest)
            if other != model and given is not None:
                parser.error(f"argument --{dest.replace('_', '-')}: is a flag of --model "
                             f"{other}, not {model}")
            if other == model and given is None:
                setattr(args, dest, default)
    if args.lr is None:
        args.lr = LEARNING_RATES[model]
    if args.synth_lr is None:
        args.synth_lr = SYNTH_LEARNING_RATES[model]
    if model == "lstm" and args.target_decay >= 1:
        parser.error("argument --target-decay: must be below 1")
    if model == "lstm":
        refuse_input_window_without_synthesizer(parser, args)
    if model == "gpt":
        if args.width % args.heads:
            parser.error(f"argument --heads: --width {args.width} is not a multiple of "
                         f"{args.heads}")
        if args.method == "bp" and (args.cuts is not None or args.conditioned):
            parser.error("argument --cuts/--conditioned: for --method dni, not bp")
        if args.method != "dni" and args.lower_lr != 1.0:
            parser.error(f"argument --lower-lr: for --method dni, not {args.method}")
        if args.method == "dni" and args.synthesizer == "loss_gradient" and not args.conditioned:
            parser.error("argument --synthesizer: loss_gradient needs --conditioned True")
        if args.method == "frozen" and args.conditioned:
            parser.error("argument --conditioned: for --method dni, not frozen")
        if args.method == "bp":
            return args
        if args.cuts is None:
            args.cuts = even_cuts(args.layers, max(stages, 2))
        if stages > 1 and len(args.cuts) != stages - 1:
            parser.error(f"argument --cuts: {stages} processes need {stages - 1} cuts, got "
                         f"{len(args.cuts)}")
        if any(cut > args.layers for cut in args.cuts) or len(set(args.cuts)) < len(args.cuts):
            parser.error(f"argument --cuts: distinct blocks from 0 to --layers {args.layers}, "
                         f"got {' '.join(map(str, args.cuts))}")
        args.cuts = sorted(args.cuts)
    return args
