"""The DNI paper's Table 1 on MNIST, ours beside the paper's: test error (%) of No Bprop (only
the classifier head learns), backprop, DNI and cDNI, for the FCN at 3 to 6 layers and the CNN at
3 and 4, each cell a real run of the project's scripts at a fixed budget (20 epochs, the
scripts' defaults otherwise).

Usage: python bench/table1.py [--models fcn cnn] [--layers 3 4 5 6] [--methods ...]
       [--epochs 20] [--results DIR] [--jobs 1] [--table-only]
Every run has its own folder under --results: finished runs are read back, interrupted ones
resumed, so the table fills in over several invocations. --jobs N runs N cells at once, one
thread each. --table-only prints what is there.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from bench.script_runs import add_jobs_argument, finished_summary, script_runs, threads_note
from experiment.cli import Parser, positive_int, run

METHODS = ("no_bprop", "bp", "dni", "cdni")
METHOD_NAMES = {"no_bprop": "No Bprop", "bp": "Bprop", "dni": "DNI", "cdni": "cDNI"}
LAYERS = {"fcn": (3, 4, 5, 6), "cnn": (3, 4)}

# Jaderberg et al., "Decoupled Neural Interfaces using Synthetic Gradients" (arXiv 1608.05343),
# Table 1, MNIST test error % after 500k iterations. Not checked against a copy of the table
# (docs/results.md, footnote on the paper's figures); whoever checks them sets this to True.
PAPER_VERIFIED = False
PAPER_MARK = "" if PAPER_VERIFIED else "*"   # beside the paper's figures where printed
PAPER_FOOTNOTE = "" if PAPER_VERIFIED else (
    "* The paper's figures as recorded in bench/table1.py, unverified: no copy of the paper's "
    "Table 1 was at hand to check them.")
PAPER = {
    ("fcn", 3): {"no_bprop": 9.3, "bp": 2.0, "dni": 1.9, "cdni": 2.2},
    ("fcn", 4): {"no_bprop": 12.6, "bp": 1.8, "dni": 2.2, "cdni": 1.9},
    ("fcn", 5): {"no_bprop": 16.2, "bp": 1.8, "dni": 3.4, "cdni": 1.7},
    ("fcn", 6): {"no_bprop": 21.4, "bp": 2.1, "dni": 4.3, "cdni": 1.6},
    ("cnn", 3): {"no_bprop": 0.9, "bp": 0.8, "dni": 0.9, "cdni": 1.0},
    ("cnn", 4): {"no_bprop": 2.8, "bp": 0.6, "dni": 0.7, "cdni": 0.8},
}


def cnn_channels(layers: int) -> list[str]:
    """The CNN's --channels for a network of `layers` layers as the paper counts them: layers
    - 1 conv blocks (32, then 64 channels), each with an interface, then the classifier."""
    return [str(c) for c in (32, *[64] * (layers - 2))]


def command(model: str, layers: int, method: str, epochs: int) -> list[str]:
    """The script and flags of one cell."""
    if model == "fcn":  # the paper counts the classifier among the layers (bench/README.md)
        shape = ["--depth", str(layers - 1)]
        baseline, name = "mlp.py", "mlp"
    else:
        shape = ["--channels", *cnn_channels(layers)]
        baseline, name = "cnn.py", "cnn"
    if method in ("no_bprop", "bp"):
        flags = [baseline] + (["--head-only"] if method == "no_bprop" else [])
    else:
        flags = ["main.py", "--model_type", name]
        flags += ["--conditioned", "True"] if method == "cdni" else []
    return [*flags, *shape, "--epochs", str(epochs)]


def cell_folder(results: Path, model: str, layers: int, method: str, epochs: int) -> Path:
    """Where one cell's run lives."""
    return results / f"{model}{layers}-{method}-e{epochs}"


def format_cell(ours: float | None, paper: float | None) -> str:
    """'ours (paper)' test error, a dash where a figure is missing."""
    mine = f"{ours:.2f}" if ours is not None else "-"
    return f"{mine} ({paper:.1f})" if paper is not None else mine


def main() -> None:
    """Run the missing cells, then print the table."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(LAYERS), default=list(LAYERS),
                        help="networks")
    parser.add_argument("--layers", nargs="+", type=positive_int, default=None,
                        help="depths to run (default: 3 4 5 6 for fcn, 3 4 for cnn)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="rows to run")
    parser.add_argument("--epochs", type=positive_int, default=20, help="epochs of every run")
    parser.add_argument("--results", type=Path, default=ROOT / "runs" / "bench-table1",
                        help="folder of the run folders, kept between invocations")
    add_jobs_argument(parser)
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: print the table of the runs already finished")
    args = parser.parse_args()
    print(f"hardware: {platform.machine()}, {threads_note(args.jobs)}, torch {torch.__version__}")
    columns = [(m, n) for m in args.models for n in LAYERS[m]
               if args.layers is None or n in args.layers]
    cells = [(model, layers, method) for model, layers in columns for method in args.methods]
    folders = [cell_folder(args.results, *cell, args.epochs) for cell in cells]
    if args.table_only:
        summaries = [finished_summary(folder) for folder in folders]
    else:
        summaries = script_runs([(command(*cell, args.epochs), folder)
                                 for cell, folder in zip(cells, folders)], args.jobs)
    errors = {cell: 100 * (1 - summary["test_acc"])
              for cell, summary in zip(cells, summaries) if summary is not None}
    print(f"\nTest error %, ours after {args.epochs} epochs (the paper's{PAPER_MARK} after 500k "
          "iterations in brackets)\n")
    print("| | " + " | ".join(f"{m.upper()} {n} layers" for m, n in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for method in args.methods:
        cells = [format_cell(errors.get((m, n, method)), PAPER.get((m, n), {}).get(method))
                 for m, n in columns]
        print(f"| {METHOD_NAMES[method]} | " + " | ".join(cells) + " |")
    if PAPER_FOOTNOTE:
        print(f"\n{PAPER_FOOTNOTE}")


if __name__ == "__main__":
    run(main)
