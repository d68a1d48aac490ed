"""The DNI paper's language-modelling table on this project's corpus: test bits per character
of truncated BPTT, DNI and DNI+Aux at T = 2, 3, 4, 5 and 8, over seeds, each cell a real run
of lm.py (early stopping on validation, no learning-rate decay, as the paper has it; --steps
caps every run).

Usage: python bench/lm.py [--truncations 2 3 4 5 8] [--methods bptt dni dni_aux]
       [--seeds 0 1] [--steps N] [--results DIR] [--jobs 1] [--table-only] [--figure F]
       [--cost REPEATS [--profile]] [-- LM.PY FLAGS]

`--cost`: instead, the time of one training step of each method at each T, medians of
interleaved repeats on one pinned thread, and each method's ratio to BPTT at the same T;
`--profile` with it: where each step's time goes, by torch.profiler.

Every run has its own folder under --results: finished runs are read back, interrupted ones
resumed, so the table fills in over several invocations. Flags after `--` go to every lm.py.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from bench.script_runs import (
    add_jobs_argument,
    finished_summary,
    script_runs,
    threads_note,
)
from experiment.cli import Parser, positive_int, run
from experiment.lm_flags import METHODS

METHOD_NAMES = {"bptt": "BPTT", "dni": "DNI", "dni_aux": "DNI+Aux"}


def cell_folder(results: Path, method: str, truncation: int, seed: int) -> Path:
    """Where one run lives."""
    return results / f"{method}-T{truncation}-s{seed}"


def command(method: str, truncation: int, seed: int, steps: int | None,
            extra: list[str]) -> list[str]:
    """lm.py and its flags for one run."""
    cap = ["--steps", str(steps)] if steps else []
    return ["lm.py", "--method", method, "--truncation", str(truncation), "--seed", str(seed),
            *cap, *extra]


@contextmanager
def warm_loops(methods: list[str], truncations: list[int], extra: list[str]
               ) -> Iterator[dict[tuple[str, int], object]]:
    """One lm.py training loop per (method, T), built as lm.py builds it, on random text of the
    corpus's alphabet size (so no corpus is read) in a scratch folder, each stepped twice in
    turn to warm up; the block runs on one pinned thread."""
    import tempfile

    from bench.timing import one_pinned_thread
    from experiment.data import TextSplits
    from experiment.lm_flags import parse_args
    from experiment.lm_train import make_loop

    ids = torch.randint(65, (400_000,), generator=torch.Generator().manual_seed(0))
    text = TextSplits("".join(map(chr, range(32, 97))), ids, ids[:2000], ids[:2000])
    with tempfile.TemporaryDirectory() as scratch, one_pinned_thread():
        loops = {(m, t): make_loop(parse_args(["--method", m, "--truncation", str(t),
                                               "--device", "cpu", *extra]),
                                   text, Path(scratch), torch.device("cpu"))
                 for t in truncations for m in methods}
        for _ in range(2):
            for loop in loops.values():
                loop.train_step()
        yield loops


def step_costs(loops: dict[tuple[str, int], object], repeats: int
               ) -> dict[tuple[str, int], float]:
    """Median seconds of one training step per (method, T) of `loops` (warm_loops'), each
    stepped in turn `repeats` times."""
    times: dict[tuple[str, int], list[float]] = {c: [] for c in loops}
    for _ in range(repeats):
        for config, loop in loops.items():
            start = time.perf_counter()
            loop.train_step()
            times[config].append(time.perf_counter() - start)
    return {c: statistics.median(t) for c, t in times.items()}


# where a step's operator time goes: the first part whose prefix an operator's name starts with
PROFILE_PARTS = {
    "LSTM core, forward and backward": ("aten::mkldnn_rnn", "aten::lstm"),
    "matrix products (readout, S, aux head)": ("aten::addmm", "aten::mm", "aten::bmm"),
    "Adam and S's slow copy": ("aten::_fused_adam", "aten::lerp"),
}
OTHER_OPERATORS, OUTSIDE = "other operators", "outside"
STEP_SPAN = "bench-lm-step"


def attribute_events(events, configs: list, repeats: int) -> tuple[dict, dict]:
    """From torch.profiler's events of `repeats` rounds, each step inside a span named
    "STEP_SPAN round index" (index into `configs`): per config, each part's seconds per
    round ({part: [seconds]}: the operators' own CPU time; OUTSIDE: the span's time less its
    operators', i.e. Python, dispatch, the autograd engine and the profiler's own cost) and
    each part's operator calls. An operator outside every span, or a step whose LSTM ran
    without oneDNN's kernel (whose parts the prefixes would misread), is an error."""
    names = [*PROFILE_PARTS, OTHER_OPERATORS]
    seconds = {c: {n: [0.0] * repeats for n in [*names, OUTSIDE]} for c in configs}
    calls = {c: dict.fromkeys(names, 0) for c in configs}
    fused = {c: False for c in configs}
    for event in events:
        root = event
        while root.cpu_parent is not None:
            root = root.cpu_parent
        if event is root and event.name.startswith(STEP_SPAN + " "):
            round_, index = map(int, event.name.split()[1:])
            seconds[configs[index]][OUTSIDE][round_] += event.cpu_time_total / 1e6
            continue
        if not event.name.startswith("aten::"):
            continue                  # Python-level spans: their operators are counted
        if not root.name.startswith(STEP_SPAN + " "):
            raise RuntimeError(f"profile: operator {event.name} ran outside the timed steps")
        round_, index = map(int, root.name.split()[1:])
        config = configs[index]
        part = next((name for name, prefixes in PROFILE_PARTS.items()
                     if event.name.startswith(prefixes)), OTHER_OPERATORS)
        seconds[config][part][round_] += event.self_cpu_time_total / 1e6
        seconds[config][OUTSIDE][round_] -= event.self_cpu_time_total / 1e6
        calls[config][part] += 1
        fused[config] = fused[config] or event.name.startswith("aten::mkldnn_rnn")
    if not all(fused.values()):
        raise RuntimeError("profile: the LSTM ran without oneDNN's kernel (aten::mkldnn_rnn*); "
                           "its parts would be counted as products and other operators")
    return seconds, calls


def step_profile(loops: dict[tuple[str, int], object], repeats: int
                 ) -> dict[tuple[str, int], dict[str, tuple[float, float]]]:
    """Per (method, T) of `loops` (warm_loops'): each part's seconds a step (median over
    steps) and operator calls a step (attribute_events' parts), by torch.profiler over
    `repeats` interleaved rounds of a step each."""
    from torch.profiler import ProfilerActivity, profile, record_function

    configs = list(loops)
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        for round_ in range(repeats):
            for index, loop in enumerate(loops.values()):
                with record_function(f"{STEP_SPAN} {round_} {index}"):
                    loop.train_step()
    seconds, calls = attribute_events(profiled.events(), configs, repeats)
    return {c: {n: (statistics.median(seconds[c][n]), calls[c].get(n, 0) / repeats)
                for n in seconds[c]} for c in configs}


def print_profile(parts: dict[tuple[str, int], dict[str, tuple[float, float]]],
                  costs: dict[tuple[str, int], float]) -> None:
    """The profile table: ms a step in each part, per method and T, beside the step's time."""
    names = list(next(iter(parts.values())))
    print("\nWhere a step's time goes, ms, medians over the steps (step: unprofiled; the parts "
          "by torch.profiler: operators' own CPU time; outside: the rest of the profiled step, "
          "Python, dispatch, the autograd engine and the profiler's own cost)\n")
    print("| method | T | step | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for (method, t), part in parts.items():
        print(f"| {METHOD_NAMES[method]} | {t} | {1e3 * costs[(method, t)]:.2f} | "
              + " | ".join(f"{1e3 * part[name][0]:.2f}" for name in names) + " |")


def print_costs(costs: dict[tuple[str, int], float], methods: list[str],
                truncations: list[int]) -> None:
    """The step-time table: milliseconds, and the ratio to BPTT at the same T."""
    print("\nOne training step, ms (ratio to BPTT at the same T)\n")
    print("| | " + " | ".join(f"T = {t}" for t in truncations) + " |")
    print("|---|" + "---|" * len(truncations))
    for method in methods:
        cells = []
        for t in truncations:
            ms, base = 1e3 * costs[(method, t)], costs.get(("bptt", t))
            ratio = f" ({costs[(method, t)] / base:.2f}x)" if base and method != "bptt" else ""
            cells.append(f"{ms:.2f}{ratio}")
        print(f"| {METHOD_NAMES[method]} | " + " | ".join(cells) + " |")


def format_cell(values: list[float]) -> str:
    """'median (min-max, n)' of the seeds' test BPC, '-' for none."""
    if not values:
        return "-"
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:.3f} (1 seed)"
    return f"{middle:.3f} ({min(values):.3f}-{max(values):.3f}, {len(values)} seeds)"


def main() -> None:
    """Run the missing cells, then print the table and draw the figure."""
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = Parser(description=__doc__.split("\n\n")[0],
                    epilog="Flags after -- go to every lm.py run (e.g. -- --eval-every 1000; "
                           "see lm.py --help).")
    parser.add_argument("--truncations", nargs="+", type=positive_int, default=[2, 3, 4, 5, 8],
                        help="columns: T of every run")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="rows")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds per cell")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="cap every run at N steps (default: lm.py's epochs and "
                             "early stopping)")
    parser.add_argument("--results", type=Path, default=ROOT / "runs" / "bench-lm",
                        help="folder of the run folders, kept between invocations")
    add_jobs_argument(parser)
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: print the table of the finished runs")
    parser.add_argument("--cost", type=positive_int, default=None, metavar="REPEATS",
                        help="time REPEATS steps of each method and T instead (default: off)")
    parser.add_argument("--profile", action="store_true",
                        help="with --cost: also say where each step's time goes, by "
                             "torch.profiler")
    parser.add_argument("--figure", type=Path, default=None,
                        help="draw validation BPC against step here, a panel per T "
                             "(default: RESULTS/lm_bpc.png; with --table-only, no figure)")
    args = parser.parse_args(argv)
    if args.profile and not args.cost:
        parser.error("argument --profile: needs --cost REPEATS")
    if args.cost:
        print(f"hardware: {platform.machine()}, one pinned thread, torch {torch.__version__}")
        with warm_loops(args.methods, args.truncations, extra) as loops:
            costs = step_costs(loops, args.cost)
            print_costs(costs, args.methods, args.truncations)
            if args.profile:       # the same loops, after the timed steps
                print_profile(step_profile(loops, args.cost), costs)
        return
    print(f"hardware: {platform.machine()}, {threads_note(args.jobs)}, torch {torch.__version__}")
    cells = [(m, t, s) for t in args.truncations for m in args.methods for s in args.seeds]
    folders = [cell_folder(args.results, *cell) for cell in cells]
    if args.table_only:
        summaries = [finished_summary(folder) for folder in folders]
    else:
        summaries = script_runs([(command(*cell, args.steps, extra), folder)
                                 for cell, folder in zip(cells, folders)], args.jobs)
    bpc = {}
    for (method, truncation, _), summary in zip(cells, summaries):
        if summary is not None:
            bpc.setdefault((method, truncation), []).append(summary["test_bpc"])
    print("\nTest bits per character, median over seeds (range)\n")
    print("| | " + " | ".join(f"T = {t}" for t in args.truncations) + " |")
    print("|---|" + "---|" * len(args.truncations))
    for method in args.methods:
        row = [format_cell(bpc.get((method, t), [])) for t in args.truncations]
        print(f"| {METHOD_NAMES[method]} | " + " | ".join(row) + " |")
    if "bptt" in args.methods:
        for method in (m for m in args.methods if m != "bptt"):
            gaps = []
            for t in args.truncations:
                ours, base = bpc.get((method, t)), bpc.get(("bptt", t))
                gaps.append(f"{statistics.median(ours) - statistics.median(base):+.3f}"
                            if ours and base else "-")
            print(f"| {METHOD_NAMES[method]} - BPTT | " + " | ".join(gaps) + " |")
    figure = args.figure or (None if args.table_only else args.results / "lm_bpc.png")
    if figure is None:      # a reprint leaves a committed figure as it was drawn
        return
    from experiment.figures import draw_bpc_curves

    panels = {f"T = {t}": [(METHOD_NAMES[m], folder) for (m, tt, _), folder
                           in zip(cells, folders) if tt == t and folder.exists()]
              for t in args.truncations}
    print(draw_bpc_curves(panels, figure))


if __name__ == "__main__":
    run(main)
