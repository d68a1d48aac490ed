"""The paper's own budget for main.py's MNIST FCN (3 hidden blocks, the paper's 4-layer FCN):
Adam at 3e-5 (a tenth from update 300k, a hundredth from 400k: `--schedule step`), batch 256,
500k updates; DNI with the paper's synthesizer (two hidden layers of 1024, Linear-BN-ReLU, then
a zero-initialised Linear), cDNI with a linear one, and backprop at the same settings. Draws
test error against updates beside the 20-epoch runs of main.py's defaults.

Usage: python bench/paper_budget.py [--methods cdni bp dni] [--updates 500000]
       [--results DIR] [--defaults DIR] [--figure-only]
Each run lives in its own folder under --results and checkpoints every epoch: run the command
again to resume. --figure-only draws what the runs have logged so far (finished or not).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.script_runs import script_run
from experiment.cli import Parser, positive_int, run
from experiment.errors import UserError
from experiment.figures import load_run, save_figure
from experiment.train import STEP_MILESTONES

TRAIN_SIZE, BATCH = 60000, 256
PAPER = ["--batch-size", str(BATCH), "--lr", "3e-5", "--schedule", "step",
         "--log-every", "0"]
COMMANDS = {
    "bp": ["mlp.py", *PAPER],
    "dni": ["main.py", "--model_type", "mlp", *PAPER, "--synthesizer", "mlp",
            "--synth-hidden", "1024", "--synth-layers", "3", "--synth-lr", "3e-5"],
    "cdni": ["main.py", "--model_type", "mlp", "--conditioned", "True", *PAPER,
             "--synthesizer", "linear", "--synth-lr", "3e-5"],
}
NAMES = {"bp": "backprop", "dni": "DNI", "cdni": "cDNI"}
COLOURS = {"bp": "k", "dni": "tab:red", "cdni": "tab:blue"}


def epochs_for(updates: int) -> int:
    """Epochs of at least `updates` updates at batch 256 on the full training set."""
    return math.ceil(updates / math.ceil(TRAIN_SIZE / BATCH))


def draw(results: Path, defaults: Path, methods: list[str], out: Path,
         updates: int = 500_000) -> Path:
    """Test error against updates (log scale) of the paper-budget runs (as far as they have
    got) and of the 20-epoch default runs found in `defaults` (bench/table1.py's folders);
    dotted lines where the paper's schedule divides the rate by ten."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for method in methods:
        for folder, style, what in ((results / method, "-", "paper's settings"),
                                    (defaults / f"fcn4-{method}-e20",
                                     "--", "main.py / mlp.py defaults, 20 epochs")):
            try:
                epochs = load_run(folder).epochs
            except UserError:
                continue
            points = [(r["step"], 100 * (1 - r["test_acc"])) for r in epochs if "test_acc" in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, color=COLOURS[method], label=f"{NAMES[method]}, {what} "
                        f"({ys[-1]:.2f}% at {xs[-1]:,.0f})")
                drawn += 1
    if not drawn:
        raise UserError(f"no run with epoch records under {results} or {defaults}")
    for milestone in STEP_MILESTONES:
        ax.axvline(milestone * updates, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("updates")
    ax.set_ylabel("test error (%)")
    ax.set_title("MNIST FCN 3x256 (the paper's 4 layers): its budget against 20 epochs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, out)


def main() -> None:
    """Run (or resume) the paper-budget runs in turn, then draw the figure."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(COMMANDS),
                        default=["cdni", "bp", "dni"], help="runs, in this order")
    parser.add_argument("--updates", type=positive_int, default=500_000,
                        help="updates of each run (the paper's 500k)")
    parser.add_argument("--results", type=Path, default=ROOT / "runs" / "bench-paper-budget",
                        help="folder of the run folders, kept between invocations")
    parser.add_argument("--defaults", type=Path, default=ROOT / "runs" / "bench-table1",
                        help="bench/table1.py's results, for the 20-epoch default runs")
    parser.add_argument("--figure-only", action="store_true",
                        help="run nothing: draw the figure from what has been logged")
    args = parser.parse_args()
    if not args.figure_only:
        for method in args.methods:
            summary = script_run([*COMMANDS[method], "--epochs", str(epochs_for(args.updates))],
                                 args.results / method)
            print(f"{NAMES[method]}: test error {100 * (1 - summary['test_acc']):.2f}%")
    path = draw(args.results, args.defaults, args.methods, args.results / "test_error.png",
                args.updates)
    print(f"figure: {path}")


if __name__ == "__main__":
    run(main)
