"""The DNI paper's own budget for its MNIST FCNs: Adam at 3e-5 (a tenth from update 300k, a
hundredth from 400k), batch 256, 500k updates; DNI with the paper's synthesizer (two hidden
layers of 1024, Linear-BN-ReLU, then a zero-initialised Linear), cDNI with a linear one, both
as the paper has them (no centring), and backprop at the same settings. Draws test error
against updates beside the 20-epoch runs of the scripts' defaults.

Usage: python bench/paper_budget.py [--layers 3 4] [--methods dni cdni bp] [--updates 500000]
       [--engine graphs|scripts] [--jobs 1] [--results DIR] [--defaults DIR] [--figure-only]
Layers count as the paper counts them, the classifier included (--depth layers-1).
Engines: `scripts` runs main.py / mlp.py, one run after another (or --jobs at once, one thread
each), each in its own folder with a checkpoint every epoch (the CPU's way). `graphs` trains all
the runs at once in this process, each step one CUDA graph replay on the run's own stream (a
GPU's way: 500k small steps are launch-bound; on a CPU it runs the same steps eagerly); every
batch is a full 256 (the rest of an epoch's order is left out); a checkpoint every
--checkpoint-every epochs and at the epoch's end after --stop-after seconds or a signal. Either
way, run the command again to resume. --figure-only prints where the runs stand and draws
what they have logged so far.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F

from bench.script_runs import add_jobs_argument, finished_summary, script_runs, threads_note
from experiment.cli import Parser, positive_float, positive_int, resolve_device, run
from experiment.data import batch_order, load_mnist, num_batches
from experiment.errors import UserError
from experiment.figures import load_run, save_figure
from experiment.graphed import GraphedTrainer, one_hot_rows
from experiment.loop import StopRequest
from experiment.records import CHECKPOINT, MetricsLog, load_checkpoint, save_checkpoint, write_json
from experiment.schedules import STEP_MILESTONES, rate_factor
from experiment.train import adam, evaluate

BATCH, LR, UPDATES = 256, 3e-5, 500_000
SCHEDULE = "step"
SYNTHESIZERS = {"dni": ("mlp", {"hidden_size": 1024, "num_layers": 3}), "cdni": ("linear", {})}
METHODS = ("dni", "cdni", "bp")
NAMES = {"bp": "backprop", "dni": "DNI", "cdni": "cDNI"}
COLOURS = {"bp": "k", "dni": "tab:red", "cdni": "tab:blue"}


def command(method: str, layers: int) -> list[str]:
    """The script and flags of one run at the paper's settings (without --epochs)."""
    shape = ["--depth", str(layers - 1), "--batch-size", str(BATCH), "--lr", str(LR),
             "--schedule", SCHEDULE, "--log-every", "0"]
    if method == "bp":
        return ["mlp.py", *shape]
    synthesizer, options = SYNTHESIZERS[method]
    flags = ["main.py", "--model_type", "mlp", *shape, "--synthesizer", synthesizer,
             "--synth-lr", str(LR), "--center-gradients", "False"]
    if options:
        flags += ["--synth-hidden", str(options["hidden_size"]),
                  "--synth-layers", str(options["num_layers"])]
    if method == "cdni":
        flags += ["--conditioned", "True"]
    return flags


def run_name(method: str, layers: int) -> str:
    """The folder of one run under --results: fcn<layers>-<method>."""
    return f"fcn{layers}-{method}"


def epochs_for(updates: int, steps_per_epoch: int) -> int:
    """Epochs of at least `updates` updates."""
    return math.ceil(updates / steps_per_epoch)


# -- the graphs engine ---------------------------------------------------------------------

@dataclass
class BudgetRun:
    """One run of the graphs engine: its trainer, records and place in the budget."""

    name: str
    method: str
    layers: int
    model: torch.nn.Module
    trainer: GraphedTrainer
    generator: torch.Generator      # the epochs' batch orders, as the scripts draw them
    folder: Path
    epoch: int = 1                  # the epoch in progress
    step: int = 0
    wall_seconds: float = 0.0       # since the run began, over every invocation
    rows: int = 0
    log: MetricsLog | None = None

    @property
    def interfaces(self) -> int:
        """How many synthetic-gradient interfaces the run has (0: backprop)."""
        return len(getattr(self.model, "interfaces", []))


def build_run(method: str, layers: int, data, seed: int, results: Path) -> BudgetRun:
    """The network, optimizer and trainer of one run, initialised as main.py / mlp.py
    initialise theirs for the same flags and seed."""
    from experiment.networks import attach_dni
    from model import FCN

    device = data.train_x.device
    torch.manual_seed(seed)
    net = FCN(depth=layers - 1).to(device)
    optimizer = adam(net.parameters(), lr=LR, capturable=device.type == "cuda")
    model, forward = net, None
    if method != "bp":
        synthesizer, options = SYNTHESIZERS[method]
        model = attach_dni(net, optimizer, data.train_x[:2], synthesizer=synthesizer,
                           conditioned=method == "cdni", synthesizer_lr=LR,
                           center_gradients=False, **options)
        if method == "cdni":
            def forward(m, x, y):
                return m(x, context=one_hot_rows(y, 10))
    trainer = GraphedTrainer(model, optimizer, data.train_x, data.train_y, BATCH, forward)
    return BudgetRun(run_name(method, layers), method, layers, model, trainer,
                     torch.Generator().manual_seed(seed), results / run_name(method, layers))


def budget_of(args: argparse.Namespace) -> dict:
    """What a saved run must have been started with to be resumed by this command."""
    return {"updates": args.updates, "train_size": args.train_size, "seed": args.seed}


def resume(run: BudgetRun, args: argparse.Namespace) -> None:
    """Load the run's checkpoint, if it has one (before the capture, which keeps it)."""
    path = run.folder / CHECKPOINT
    if not path.exists():
        return
    saved = load_checkpoint(run.folder, run.trainer.device)
    if saved.get("budget") != budget_of(args):
        raise UserError(f"{path} was saved by a run with {saved.get('budget')}, not "
                        f"{budget_of(args)}: give the same flags, or delete its folder")
    try:
        run.trainer.load_state(saved["trainer"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{path} does not fit the {run.name} run ({exc}); delete its folder "
                        "to start it again") from None
    run.generator.set_state(saved["generator"].cpu())   # loaded onto the training device
    run.epoch, run.step, run.rows = saved["epoch"], saved["step"], saved["rows"]
    run.wall_seconds = saved["wall_seconds"]


def checkpoint(run: BudgetRun, args: argparse.Namespace) -> Path:
    """Save the run at an epoch's end."""
    return save_checkpoint(run.folder, {
        "trainer": run.trainer.state(), "generator": run.generator.get_state(),
        "epoch": run.epoch, "step": run.step, "rows": run.rows,
        "wall_seconds": run.wall_seconds, "budget": budget_of(args)})


def cosine_columns(run: BudgetRun) -> dict[str, float]:
    """Each interface's cosine to the true gradient on a batch of the run's order (no
    change to training)."""
    if not run.interfaces:
        return {}
    rows = run.trainer.order[0]
    x, y = run.trainer.train_x[rows], run.trainer.train_y[rows]
    context = one_hot_rows(y, 10) if run.method == "cdni" else None
    cosines = run.model.gradient_cosines(F.cross_entropy, x, y, context=context)
    return {f"cos{i}": c for i, c in enumerate(cosines, start=1)}


def train_graphed(names: list[tuple[str, int]], data, args: argparse.Namespace) -> list[BudgetRun]:
    """Train the runs (method, layers) together, one step of each in turn, with a checkpoint
    every --checkpoint-every epochs; stop (all saved) at the first epoch's end after
    --stop-after seconds or a signal. Returns the runs left unfinished."""
    runs = [build_run(method, layers, data, args.seed, args.results) for method, layers in names]
    runs = [r for r in runs if finished_summary(r.folder) is None]
    if not runs:
        return []
    steps_per_epoch = runs[0].trainer.steps_per_epoch
    epochs = epochs_for(args.updates, steps_per_epoch)
    total_steps = epochs * steps_per_epoch
    begin = time.perf_counter()
    for r in runs:
        r.folder.mkdir(parents=True, exist_ok=True)
        resume(r, args)
        r.trainer.capture()
        columns = [f"cos{i}" for i in range(1, r.interfaces + 1)]
        r.log = MetricsLog(r.folder / "metrics.csv", columns,
                           keep_rows=r.rows if r.step else None)
    print(f"{len(runs)} runs, {steps_per_epoch} updates an epoch, {epochs} epochs, "
          f"{total_steps:,} updates each; set up in {time.perf_counter() - begin:.1f}s on "
          f"{data.train_x.device}", flush=True)
    started = time.perf_counter()
    with StopRequest() as stop:
        while runs:
            tick = time.perf_counter()
            for r in runs:
                r.trainer.start_epoch(batch_order(len(data.train_x), r.generator, data.train_x.device))
            for _ in range(steps_per_epoch):
                for r in runs:
                    r.trainer.set_rate_factor(rate_factor(SCHEDULE, r.step, total_steps))
                    r.trainer.step()
                    r.step += 1
            for r in list(runs):
                if not end_epoch(r, data, args, epochs, time.perf_counter() - tick):
                    runs.remove(r)
            if runs and runs[0].epoch in (3, 12):   # the pace, once warm: what the rest takes
                pace = time.perf_counter() - tick
                print(f"{pace:.3f}s an epoch of {len(runs)} runs: about "
                      f"{pace * (epochs - runs[0].epoch + 1):.0f}s to the end", flush=True)
            for r in [r for r in runs if r.epoch > epochs]:
                finish(r, args)
                runs.remove(r)
            out_of_time = time.perf_counter() - started > args.stop_after
            if runs and (out_of_time or stop.signum is not None):
                for r in runs:
                    checkpoint(r, args)
                why = "--stop-after passed" if out_of_time else "stopped by a signal"
                print(f"{why}: {len(runs)} runs saved at update {runs[0].step:,} of "
                      f"{total_steps:,}; run the same command to go on", flush=True)
                return runs
            if runs and (runs[0].epoch - 1) % args.checkpoint_every == 0:
                for r in runs:
                    checkpoint(r, args)
    return []


def end_epoch(run: BudgetRun, data, args: argparse.Namespace, epochs: int, seconds: float) -> bool:
    """Evaluate the run, write its epoch row, print a line every --print-every epochs;
    `seconds`: the epoch's wall time (all the runs trained together). False when the run has
    diverged: its summary says so and it trains no more."""
    with run.trainer.on_stream():
        train_loss = run.trainer.epoch_loss()
        if not math.isfinite(train_loss):
            print(f"{run.name} diverged: non-finite training loss in epoch {run.epoch}; it "
                  "stops, the other runs go on", flush=True)
            finish(run, args, diverged=True)
            return False
        test_loss, test_acc = evaluate(run.model, data.test_x, data.test_y,
                                       batch_size=len(data.test_x))
        measure = run.epoch % args.measure_every == 0 or run.epoch == epochs
        cosines = cosine_columns(run) if measure else {}
    run.wall_seconds += seconds
    run.log.write({"kind": "epoch", "step": run.step, "epoch": run.epoch,
                   "wall_seconds": run.wall_seconds, "train_loss": train_loss,
                   "test_loss": test_loss, "test_acc": test_acc, **cosines})
    run.rows += 1
    if run.epoch % args.print_every == 0 or run.epoch == epochs:
        extra = "".join(f"  {k} {v:.3f}" for k, v in cosines.items())
        print(f"{run.name:<10} epoch {run.epoch:>4}/{epochs}  update {run.step:>7,}  "
              f"train_loss {train_loss:.4f}  test error {100 * (1 - test_acc):.2f}%  "
              f"{run.wall_seconds:.0f}s{extra}", flush=True)
    run.epoch += 1
    return True


def finish(run: BudgetRun, args: argparse.Namespace, diverged: bool = False) -> None:
    """summary.json of a run that has ended (the scripts engine's runs leave one too); its
    figures are those of its last evaluated epoch."""
    epochs = load_run(run.folder).epochs
    last = epochs[-1] if epochs else {"test_acc": float("nan"), "test_loss": float("nan")}
    write_json(run.folder / "summary.json", {
        "script": "bench/paper_budget.py", "engine": "graphs", "method": run.method,
        "layers": run.layers, "updates": run.step, "batch_size": BATCH, "lr": LR,
        "schedule": SCHEDULE, "test_acc": last["test_acc"], "test_loss": last["test_loss"],
        "diverged": diverged, "wall_seconds": run.wall_seconds,
        "device": str(run.trainer.device), "torch": torch.__version__, "budget": budget_of(args)})
    (run.folder / CHECKPOINT).unlink(missing_ok=True)


# -- where the runs stand ------------------------------------------------------------------

RECENT = 50   # epochs the standing table averages over


def standing(results: Path, methods: list[str], layers: list[int],
             updates: int = UPDATES) -> list[str]:
    """A markdown table of where each run under `results` stands: updates so far, test error
    now, its best and where, the mean error and each interface's mean cosine to the true
    gradient over the last RECENT epochs, and the paper's figure (runs not begun are left out)."""
    from bench.table1 import PAPER, PAPER_MARK

    source = f"paper{PAPER_MARK}"
    header = (f"| run | updates of {updates:,} | test error now | best (at update) | mean, last "
              f"{RECENT} epochs | cosines, last {RECENT} epochs | {source} |")
    lines = [header, "|---" * 7 + "|"]
    for depth in layers:
        for method in methods:
            folder = results / run_name(method, depth)
            if not (folder / "metrics.csv").exists():
                continue
            try:
                records = load_run(folder)
            except UserError as exc:   # e.g. read while a resuming run rewrites it
                lines.append(f"| {NAMES[method]}, FCN {depth} | unreadable: {exc} |||||")
                continue
            epochs = [r for r in records.epochs if "test_acc" in r]
            if not epochs:
                continue
            errors = [100 * (1 - r["test_acc"]) for r in epochs]
            best = min(range(len(errors)), key=errors.__getitem__)
            recent = epochs[-RECENT:]
            cosines = []   # one figure per interface, in order; "-" where none was measured
            for column in [c for c in records.columns if c.startswith("cos")]:
                values = [r[column] for r in recent if column in r]
                cosines.append(f"{sum(values) / len(values):.2f}" if values else "-")
            state = ("finished" if (folder / "summary.json").exists()
                     else f"epoch {int(epochs[-1]['epoch'])}")
            paper = PAPER.get(("fcn", depth), {}).get(method)
            lines.append(
                f"| {NAMES[method]}, FCN {depth} | {int(epochs[-1]['step']):,} ({state}) | "
                f"{errors[-1]:.2f}% | {errors[best]:.2f}% ({int(epochs[best]['step']):,}) | "
                f"{sum(errors[-RECENT:]) / len(recent):.2f}% | {' '.join(cosines) or '-'} | "
                f"{paper if paper is not None else '-'} |")
    return lines


# -- the figure ----------------------------------------------------------------------------

def draw(results: Path, defaults: Path, methods: list[str], layers: list[int], out: Path,
         updates: int = UPDATES) -> Path:
    """Test error against updates (log scales), one panel per depth: the paper-budget runs as
    far as they have got, and the 20-epoch default runs found in `defaults` (bench/table1.py's
    folders); dotted lines where the paper's schedule divides the rate by ten."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(layers), figsize=(6.5 * len(layers), 4.5), squeeze=False)
    drawn = 0
    for ax, depth in zip(axes[0], layers):
        for method in methods:
            for folder, style, what in ((results / run_name(method, depth), "-", "paper's settings"),
                                        (defaults / f"fcn{depth}-{method}-e20", "--",
                                         "script defaults, 20 epochs")):
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
        for milestone in STEP_MILESTONES:
            ax.axvline(milestone * updates, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("updates")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"MNIST FCN, {depth} layers ({depth - 1} hidden of 256)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    if not drawn:
        raise UserError(f"no run with epoch records under {results} or {defaults}")
    fig.suptitle("The paper's budget (Adam 3e-5, batch 256, 500k updates) against 20 epochs")
    return save_figure(fig, out)


def add_run_arguments(parser, engine: str = "") -> None:
    """The flags that choose the runs and where they train: --layers, --methods, --device,
    --train-size (`engine`: the help's prefix where only one engine uses the last two)."""
    parser.add_argument("--layers", nargs="+", type=positive_int, default=[3, 4],
                        help="FCN depths as the paper counts layers (3: two hidden blocks)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="runs at each depth")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help=f"{engine}where to train (auto: a GPU when there is one)")
    parser.add_argument("--train-size", type=positive_int, default=None,
                        help=f"{engine}the first N training images only, for tests (default: "
                             "all 60,000)")


def main() -> None:
    """Run (or resume) the paper-budget runs, print their errors, then draw the figure."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, engine="graphs engine: ")
    parser.add_argument("--updates", type=positive_int, default=UPDATES,
                        help="updates of each run (the paper's 500k)")
    parser.add_argument("--engine", choices=["graphs", "scripts"], default=None,
                        help="graphs: all runs in this process as CUDA graphs; scripts: main.py "
                             "/ mlp.py runs (default: graphs with a GPU, else scripts)")
    parser.add_argument("--stop-after", type=positive_float, default=float("inf"),
                        help="graphs engine: after this many seconds of training, save at the "
                             "epoch's end and stop (run again to go on)")
    add_jobs_argument(parser, "scripts engine: ")
    parser.add_argument("--checkpoint-every", type=positive_int, default=50,
                        help="graphs engine: epochs between checkpoints of every run")
    parser.add_argument("--measure-every", type=positive_int, default=10,
                        help="graphs engine: epochs between measurements of each interface's "
                             "cosine to the true gradient (and at the last epoch)")
    parser.add_argument("--print-every", type=positive_int, default=50,
                        help="graphs engine: epochs between printed lines of each run")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run")
    parser.add_argument("--results", type=Path, default=ROOT / "runs" / "bench-paper-budget",
                        help="folder of the run folders, kept between invocations")
    parser.add_argument("--defaults", type=Path, default=ROOT / "runs" / "bench-table1",
                        help="bench/table1.py's results, for the 20-epoch default runs")
    parser.add_argument("--figure-only", action="store_true",
                        help="run nothing: print where the runs stand and draw the figure from "
                             "what they have logged")
    args = parser.parse_args()
    names = [(method, depth) for depth in args.layers for method in args.methods]
    if not args.figure_only:
        device = resolve_device(args.device)
        engine = args.engine or ("graphs" if device.type == "cuda" else "scripts")
        hardware = (torch.cuda.get_device_name(device) if device.type == "cuda" else
                    f"{platform.machine()}, {threads_note(args.jobs if engine == 'scripts' else 1)}")
        print(f"engine {engine} on {device} ({hardware}), torch {torch.__version__}", flush=True)
        if engine == "graphs":
            data = load_mnist(ROOT / "data", device, args.train_size)
            if train_graphed(names, data, args):
                return   # stopped early: saved, nothing to report yet
        else:
            if args.train_size is not None:
                raise UserError("--train-size is for the graphs engine")
            epochs = epochs_for(args.updates, num_batches(60000, BATCH))
            script_runs([([*command(method, depth), "--epochs", str(epochs)],
                          args.results / run_name(method, depth)) for method, depth in names],
                        args.jobs)
        for method, depth in names:
            summary = finished_summary(args.results / run_name(method, depth))
            if summary is not None:
                print(f"{run_name(method, depth)}: test error "
                      f"{100 * (1 - summary['test_acc']):.2f}%"
                      + (" (diverged)" if summary.get("diverged") else ""))
    from bench.table1 import PAPER_FOOTNOTE

    print("\n".join(standing(args.results, args.methods, args.layers, args.updates)))
    if PAPER_FOOTNOTE:
        print(f"\n{PAPER_FOOTNOTE}")
    path = draw(args.results, args.defaults, args.methods, args.layers,
                args.results / "test_error.png", args.updates)
    print(f"figure: {path}")


if __name__ == "__main__":
    run(main)
