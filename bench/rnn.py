"""The longest sequence solved by truncated BPTT, DNI and DNI+Aux on copy and repeat copy at
several truncations T, over seeds (median and range), as a markdown table; DNI and DNI+Aux
also with a synthesizer that sees the last inputs (`_inputs`).

T = 0 is untruncated BPTT (the whole sequence in one chunk), the ceiling; only BPTT runs there.
The caption states the budget (steps, LSTM size, batch); a cell marked * has a seed whose
curriculum was still growing in the last quarter of its steps (not stalled: the budget is short).
--until-stalled MAX lets such a run go on from its checkpoint to where that last quarter would be
flat (4/3 of its last growth's step, rounded up to a tenth of --steps), again if it grew there,
to at most MAX steps: a budget where the curricula have stalled.

Each run is `rnn_tasks.py` in its own folder under --results; a folder with summary.json of
--steps steps is finished and skipped, one with a checkpoint is resumed, or extended to a larger
--steps (its other flags as saved). Subsets by flags, so the table can be filled a few runs at a
time (--max-runs). Every run uses one CPU thread. A run that diverges gets diverged.json (its
error and the length it had solved), counts as finished, and the bench goes on (side by side:
the other seeds resume from their checkpoints, or restart if they have none yet); the table
marks its cell with a dagger. To retry one with other flags, resume it by hand
(`rnn_tasks.py --resume FOLDER --lr ...`): its newer summary.json then counts. Any other
failure, or a signal, stops the bench.

--stack trains each cell's unfinished seeds side by side in one process, as one stacked model
(experiment/rnn_group.py), on --device (the GPU path: the whole table is one command); the runs'
folders, records and checkpoints are the same, so either way resumes the other's runs. On one
CPU thread it gains nothing (the step is compute-bound there: bench/README.md). --stack-cost N
times it instead: N interleaved steps of each run alone and of the seeds side by side, at fixed
lengths, for each task, T and method given.

Usage: python bench/rnn.py [--tasks copy repeat_copy mnist_rows] [--methods bptt dni dni_aux
       dni_inputs dni_aux_inputs] [--input-window K]
       [--truncations 0 2 3 4 5 8] [--seeds 0 1 2] [--max-runs K] [--table-only]
       [--until-stalled MAX] [--stack [--device cuda]] [--stack-cost N] [--results DIR]
       [rnn_tasks.py flags, e.g. --steps 30000 --hidden 256 --batch-size 256]
Flags it does not know go to every new rnn_tasks.py run; keep one --results folder per setting."""

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiment.cli import Parser, nonnegative_int, positive_int, run
from experiment.errors import USER_ERROR_EXIT, UserError
from experiment.rnn_train import curriculum_stalled

INPUT_WINDOW = 16  # the inputs the _inputs variants' S sees (bench/README.md: more beat fewer)
LABELS = {"bptt": "BPTT", "dni": "DNI", "dni_aux": "DNI+Aux",
          "dni_inputs": "DNI, S sees {} inputs", "dni_aux_inputs": "DNI+Aux, S sees {} inputs"}
# a bench method: rnn_tasks.py's --method, and whether S also sees the last --input-window inputs
METHODS = {"bptt": ("bptt", False), "dni": ("dni", False), "dni_aux": ("dni_aux", False),
           "dni_inputs": ("dni", True), "dni_aux_inputs": ("dni_aux", True)}


def label(method: str, window: int = INPUT_WINDOW) -> str:
    """A bench method's column heading."""
    return LABELS[method].format(window)


def window_of(method: str, window: int = INPUT_WINDOW) -> int:
    """The inputs a bench method's S sees (0: the state alone)."""
    return window if METHODS[method][1] else 0


def run_name(task: str, method: str, truncation: int, seed: int) -> str:
    """The folder of one run."""
    return f"{task}-{method}-T{truncation}-s{seed}"


def train_one(folder: Path, task: str, method: str, truncation: int, seed: int,
              extra: list[str], steps: int, window: int = INPUT_WINDOW) -> dict:
    """Run (or resume, or extend to `steps`) one rnn_tasks.py run on one thread; return its
    summary."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    argv = run_flags(folder, task, method, truncation, seed, extra, steps, window)
    cmd = [sys.executable, str(ROOT / "rnn_tasks.py"), *argv, "--threads", "1",
           "--device", "cpu", "--log-every", "100"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [""])[-1].removeprefix("error: ")
        if result.returncode == USER_ERROR_EXIT and last.startswith("training diverged"):
            return record_divergence(folder, last)
        raise UserError(f"run {folder.name} failed (exit {result.returncode}): {last}")
    return json.loads((folder / "summary.json").read_text())


def record_divergence(folder: Path, error: str) -> dict:
    """Write `folder`/diverged.json for a run that diverged: its error line and the longest
    length it had solved by its last logged step (the bench goes on; the table marks it)."""
    from experiment.figures import load_run

    logged = ([row for row in load_run(folder).steps if "max_length_solved" in row]
              if (folder / "metrics.csv").exists() else [])  # none: diverged before its first
    last = logged[-1] if logged else {"max_length_solved": 0, "step": 0}
    record = {"diverged": True, "error": error,
              "max_length_solved": int(last["max_length_solved"]),
              "last_logged_step": int(last["step"])}
    (folder / "diverged.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def run_record(folder: Path) -> dict | None:
    """The newer of a run's diverged.json and summary.json (a run extended past a summary may
    diverge; a diverged run resumed by hand may finish), None when it has neither."""
    paths = [p for p in (folder / "diverged.json", folder / "summary.json") if p.exists()]
    if not paths:
        return None
    return json.loads(max(paths, key=lambda p: p.stat().st_mtime_ns).read_text())


def run_flags(folder: Path, task: str, method: str, truncation: int, seed: int,
              extra: list[str], steps: int, window: int = INPUT_WINDOW) -> list[str]:
    """rnn_tasks.py's flags for one run: a resume of its checkpoint (its other flags as saved,
    to `steps`), or a new run with `extra`."""
    if (folder / "checkpoint.pt").exists():
        return ["--resume", str(folder), "--steps", str(steps)]
    return [*method_flags(method, window), "--task", task, "--truncation", str(truncation),
            "--seed", str(seed), "--out", str(folder), *extra]


def check_variant(folder: Path, method: str, window: int = INPUT_WINDOW) -> None:
    """Refuse a run folder whose synthesizer input window is not the bench method's (a run of
    another setting under the same name)."""
    try:
        saved = json.loads((folder / "config.json").read_text())["args"]
    except (OSError, ValueError, KeyError):
        return                                   # no record yet: nothing to contradict
    want = window_of(method, window)
    if saved.get("synth_input_window", 0) != want:
        raise UserError(f"{folder}: made with --synth-input-window "
                        f"{saved.get('synth_input_window', 0)}, not {method}'s {want}; keep one "
                        f"--results folder per setting")


def method_flags(method: str, window: int = INPUT_WINDOW) -> list[str]:
    """rnn_tasks.py's flags for a bench method (a variant: --method and its window)."""
    seen = window_of(method, window)
    return ["--method", METHODS[method][0], *(["--synth-input-window", str(seen)] if seen else [])]


def in_process_flags(argv: list[str]):
    """rnn_tasks.py's parsed flags for a run trained in this process: a relative --data-dir
    is read from ROOT, as a run alone reads it (it starts there)."""
    from experiment.rnn_train import parse_args as parse_run_flags

    args = parse_run_flags(argv)
    if not Path(args.data_dir).is_absolute():
        args.data_dir = str(ROOT / args.data_dir)
    return args


def train_stacked(folders: list[Path], cell: tuple[str, str, int], seeds: list[int],
                  extra: list[str], steps: int, window: int = INPUT_WINDOW) -> list[dict]:
    """Train the cell's runs in `folders` side by side in this process, in groups of runs
    whose checkpoints are at one step; return their records (summary, or diverged.json for a
    run that diverged: the others go on from their checkpoints)."""
    from experiment.records import load_checkpoint
    from experiment.rnn_group import RunsDiverged, train_group

    task, method, truncation = cell
    tick = time.perf_counter()
    by_step: dict[int, list] = {}
    for folder, seed in zip(folders, seeds):
        argv = run_flags(folder, task, method, truncation, seed, extra, steps, window)
        args = in_process_flags([*argv, "--log-every", "100"])
        at = (load_checkpoint(folder, torch.device("cpu"))["state"]["step"]
              if args.resume else 0)
        by_step.setdefault(at, []).append((folder, seed, args))
    for group in by_step.values():
        try:
            train_group([args for _, _, args in group], group[0][2].device)
        except RunsDiverged as exc:
            for out, error in exc.errors.items():
                print(finished_line(out, task, record_divergence(out, error),
                                    time.perf_counter() - tick, f", {len(group)} side by side"),
                      flush=True)
            rest = [(folder, seed) for folder, seed, _ in group if folder not in exc.errors]
            if rest:
                train_stacked([f for f, _ in rest], cell, [s for _, s in rest], extra, steps,
                              window)
    return [run_record(folder) for folder in folders]


COST_LENGTHS = (2, 10, 30)


def stack_cost(tasks: list[str], truncations: list[int], methods: list[str], seeds: list[int],
               extra: list[str], steps: int, window: int = INPUT_WINDOW) -> str:
    """The markdown table of a step's time alone and of the seeds side by side, at the
    lengths COST_LENGTHS (mnist_rows: its 28 rows)."""
    from experiment.rnn_group import step_seconds

    lines = [(f"| task | T | method | length | alone, ms | {len(seeds)} side by side, ms | "
             "runs/s gain |"), "|---|---|---|---|---|---|---|"]
    for task in tasks:
        for t in truncations:
            for method in runs_at(t, methods):
                runs = [in_process_flags([*method_flags(method, window), "--task", task,
                                          "--truncation", str(t), "--seed", str(seed), "--out",
                                          "unused", *extra]) for seed in seeds]
                for length in (28,) if task == "mnist_rows" else COST_LENGTHS:
                    alone, stacked = step_seconds(runs, length, steps, runs[0].device)
                    lines.append(f"| {task} | {t or 'full'} | {label(method, window)} | {length} | "
                                 f"{alone * 1e3:.1f} | {stacked * 1e3:.1f} | "
                                 f"{len(seeds) * alone / stacked:.2f}x |")
    return "\n".join(lines)


def target_steps(folder: Path, steps: int, until_stalled: int = 0) -> int | None:
    """The steps the run in `folder` should reach, None when it is done: `steps`; and with
    `until_stalled`, a finished run whose curriculum still grew in the last quarter of its steps
    goes on to where that quarter would be flat (4/3 of its last growth's step, rounded up to a
    tenth of `steps`), again if it grows there, to at most `until_stalled` steps. A diverged
    run is done, and so is one without a checkpoint to go on from."""
    record = run_record(folder)
    if record is None or (not record.get("diverged") and record["steps"] < steps):
        return steps
    if (record.get("diverged") or record["steps"] >= until_stalled or stalled(record)
            or not (folder / "checkpoint.pt").exists()):
        return None
    quantum = max(steps // 10, 1)
    flat_from = math.ceil(4 * record["levels"][-1][0] / 3)      # its last growth, 3/4 in
    return min(until_stalled, max(math.ceil(flat_from / quantum) * quantum,
                                  record["steps"] + quantum))


def runs_at(truncation: int, methods) -> list[str]:
    """The methods that run at this T: all of them, but BPTT alone untruncated (T = 0)."""
    return [m for m in methods if truncation > 0 or m == "bptt"]


def stalled(summary: dict) -> bool:
    """Whether a finished run's curriculum was flat over the last quarter of its steps, or
    could grow no more: it had solved its last level (--max-length). Worked out from its
    levels, as summary.json's `stalled` is, so that records written before that key, or before
    it counted the last level, read the same."""
    return curriculum_stalled(summary["levels"], summary["steps"],
                              solved=summary["max_length_solved"],
                              last_level=summary.get("final_length", math.inf))


def cell(values: list[float], growing: bool = False, digits: int | None = None,
         diverged: bool = False) -> str:
    """'median (min-max)' of the seeds' figures, '-' when none finished (`digits` after the
    point; None: as short as exact); `growing` adds '*' (a seed's curriculum had not
    stalled), `diverged` a dagger (a seed diverged)."""
    mark = "\u2020" if diverged else ""
    if not values:
        return "-" + mark

    def shown(x):
        return f"{x:g}" if digits is None else f"{x:.{digits}f}"

    text = shown(statistics.median(values))
    text = f"{text} ({shown(min(values))}-{shown(max(values))})" if len(values) > 1 else text
    return text + ("*" if growing else "") + mark


def figure_of(task: str, summary: dict) -> float:
    """A run's figure in the table: test accuracy in % (mnist_rows), else the longest length
    solved."""
    if task == "mnist_rows":
        return 100 * summary["test_accuracy"]
    return summary["max_length_solved"]


def budget(summaries: list[dict]) -> str:
    """'N steps a run, LSTM H, batch B' of the finished runs (the steps' range and median, and
    every other value seen, if mixed)."""
    def seen(key, default=None):
        values = sorted({s.get(key, default) for s in summaries})
        return "/".join(f"{v:,}" if isinstance(v, int) else str(v).upper() for v in values)

    steps = sorted(s["steps"] for s in summaries)
    shown = f"{steps[0]:,}" if steps and steps[0] == steps[-1] else (
        f"{steps[0]:,} to {steps[-1]:,} (median {statistics.median(steps):,.0f})" if steps
        else "")
    return (f"{shown} steps a run, {seen('core', 'lstm')} {seen('hidden')}, "
            f"batch {seen('batch_size')}" if summaries else "no run finished yet")


def table(results: Path, tasks, methods, truncations, seeds, window: int = INPUT_WINDOW,
          until_stalled: int = 0) -> str:
    """The markdown table of the finished runs, under a caption with their budget (and the
    rule that extended the runs still growing, `until_stalled` their most steps)."""
    head = ("| task | T | " + " | ".join(label(m, window) for m in methods)
            + " | seeds | s/run |")
    lines = [head, "|" + "---|" * (len(methods) + 4)]
    finished, any_diverged = [], False
    for task in tasks:
        for t in truncations:
            if not runs_at(t, methods):
                continue
            cells, seconds, counts = [], [], []
            for method in methods:
                if method not in runs_at(t, methods):
                    cells.append("")
                    continue
                values, growing, diverged = [], False, False
                for seed in seeds:
                    summary = run_record(results / run_name(task, method, t, seed))
                    if summary is not None and summary.get("diverged", False):
                        diverged = True
                        if task != "mnist_rows":   # the length it had solved still counts
                            values.append(summary["max_length_solved"])
                    elif summary is not None:
                        finished.append(summary)
                        values.append(figure_of(task, summary))
                        # runs side by side shared their process's time
                        seconds.append(summary["train_seconds"]
                                       / summary.get("stacked_runs", 1))
                        growing = growing or not stalled(summary)
                cells.append(cell(values, growing, 1 if task == "mnist_rows" else None,
                                  diverged))
                any_diverged = any_diverged or diverged
                counts.append(len(values))
            per_run = f"{statistics.mean(seconds):.0f}" if seconds else "-"
            lines.append(f"| {task} | {t or 'full'} | " + " | ".join(cells)
                         + f" | {min(counts)} | {per_run} |")
    curricula = [t for t in tasks if t != "mnist_rows"]
    measure = ("Longest length solved" if curricula else "") + (
        (" (mnist_rows: test accuracy, %)" if curricula else "Test accuracy, %")
        if "mnist_rows" in tasks else "")
    stars = (" *: a seed's curriculum still grew in the last quarter of its steps (not "
             "stalled; one that solved its last level, --max-length, has stalled)."
             if curricula else "")
    daggers = (" \u2020: a seed diverged (its diverged.json); its length solved by then counts "
               "(mnist_rows: it is left out)." if any_diverged else "")
    extended = (f" A run still growing in the last quarter of its steps goes on until that "
                f"quarter is flat, to at most {until_stalled:,} steps." if until_stalled else "")
    caption = (f"{measure}, median (range) over seeds {' '.join(map(str, seeds))}; "
               f"{budget(finished)}; T full: untruncated BPTT.{extended}{stars}{daggers}")
    return "\n".join([caption, "", *lines])


def finished_line(folder: Path, task: str, summary: dict, seconds: float,
                  note: str = "") -> str:
    """The line printed when a run (or extension) ends: its figure, whether its curriculum
    stalled (or its error, if it diverged), its steps and the seconds it took (`note` after)."""
    if summary.get("diverged"):                  # its error says at which step
        return f"{folder.name}: diverged ({summary['error']}), {seconds:.0f}s{note}"
    scored = (f"test accuracy {figure_of(task, summary):.2f}%" if task == "mnist_rows"
              else f"length {summary['max_length_solved']} ("
                   f"{'stalled' if stalled(summary) else 'still growing'})")
    return f"{folder.name}: {scored} at {summary['steps']:,} steps, {seconds:.0f}s{note}"


def main():
    """Run what is missing (up to --max-runs), then print the table."""
    parser = Parser(description=" ".join(__doc__.split("\n\n")[0].split()),
                    epilog="Flags it does not know go to every new rnn_tasks.py run (e.g. "
                           "--steps 60000 --hidden 256 --batch-size 256; see rnn_tasks.py "
                           "--help); a resumed or extended run keeps its saved flags but --steps.")
    parser.add_argument("--tasks", nargs="+", choices=["copy", "repeat_copy", "mnist_rows"],
                        default=["copy", "repeat_copy"], help="tasks (mnist_rows: sequential "
                        "MNIST, scored by test accuracy)")
    parser.add_argument("--methods", nargs="+", choices=list(LABELS),
                        default=["bptt", "dni", "dni_aux"], help="methods, the paper's by "
                        "default (_inputs: S also sees the last --input-window inputs)")
    parser.add_argument("--input-window", type=positive_int, default=INPUT_WINDOW, metavar="K",
                        help="inputs the _inputs methods' S sees (rnn_tasks.py "
                             "--synth-input-window)")
    parser.add_argument("--truncations", nargs="+", type=nonnegative_int,
                        default=[0, 2, 3, 4, 5, 8], help="truncations T (0: untruncated, BPTT only)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds")
    parser.add_argument("--results", default=str(ROOT / "runs" / "bench-rnn"),
                        help="folder of the run folders")
    parser.add_argument("--max-runs", type=nonnegative_int, default=0,
                        help="start at most this many runs or extensions, then print (0: "
                             "all)")
    parser.add_argument("--until-stalled", type=nonnegative_int, default=0, metavar="MAX",
                        help="extend runs still growing in their last quarter of steps "
                             "until it is flat, to at most MAX steps (0: off)")
    parser.add_argument("--table-only", action="store_true", help="run nothing; print")
    parser.add_argument("--stack", action="store_true",
                        help="train each cell's seeds side by side in this process, on "
                             "--device (the GPU path); without it, one CPU process a run")
    parser.add_argument("--stack-cost", type=nonnegative_int, default=0, metavar="N",
                        help="train nothing; time N steps alone and side by side (default: "
                             "0, off)")
    parser.add_argument("--figure", default=None, metavar="PNG",
                        help="also draw length reached against steps for the seed-0 runs "
                             "(default: none)")
    args, extra = parser.parse_known_args()
    if any(not e.startswith("--") for e in extra[:1]):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from experiment.rnn_train import parse_args as parse_run_flags

    steps = parse_run_flags(extra).steps  # a flag no rnn_tasks.py run takes stops here
    if 0 < args.until_stalled < steps:
        parser.error(f"argument --until-stalled: must be 0 or at least --steps ({steps}), got "
                     f"{args.until_stalled}")
    results = Path(args.results).resolve()      # runs alone start in ROOT
    results.mkdir(parents=True, exist_ok=True)
    if args.stack_cost:
        torch.set_num_threads(1)
        print(stack_cost(args.tasks, args.truncations, args.methods, args.seeds, extra,
                         args.stack_cost, args.input_window))
        return
    # the one check of the folders' settings: one of another window stops all before any runs
    for task in args.tasks:
        for t in args.truncations:
            for method in runs_at(t, args.methods):
                for seed in args.seeds:
                    check_variant(results / run_name(task, method, t, seed), method,
                                  args.input_window)
    started = 0
    cells = [(task, method, t) for task in args.tasks for t in args.truncations
             for method in runs_at(t, args.methods)]
    if args.stack:
        torch.set_num_threads(1)
    while not args.table_only:         # passes until no run is owed steps (or --max-runs)
        before = started
        if args.stack:
            for task, method, t in cells:
                by_target: dict[int, list[int]] = {}
                for seed in args.seeds:
                    target = target_steps(results / run_name(task, method, t, seed), steps,
                                          args.until_stalled)
                    if target is not None:
                        by_target.setdefault(target, []).append(seed)
                for target, seeds in by_target.items():
                    if args.max_runs:
                        seeds = seeds[:max(args.max_runs - started, 0)]
                    if not seeds:
                        continue
                    started += len(seeds)
                    tick = time.perf_counter()
                    folders = [results / run_name(task, method, t, seed) for seed in seeds]
                    summaries = train_stacked(folders, (task, method, t), seeds, extra, target,
                                              args.input_window)
                    seconds = time.perf_counter() - tick
                    for folder, summary in zip(folders, summaries):
                        if not summary.get("diverged"):     # printed as it diverged
                            print(finished_line(folder, task, summary, seconds,
                                                f", {summary['stacked_runs']} side by side"),
                                  flush=True)
        else:
            for seed in args.seeds:              # seed by seed: every cell gets a first run
                for task, method, t in cells:
                    folder = results / run_name(task, method, t, seed)
                    target = target_steps(folder, steps, args.until_stalled)
                    if target is None or (args.max_runs and started >= args.max_runs):
                        continue
                    started += 1
                    tick = time.perf_counter()
                    summary = train_one(folder, task, method, t, seed, extra, target,
                                        args.input_window)
                    print(finished_line(folder, task, summary, time.perf_counter() - tick),
                          flush=True)
        if started == before:
            break
    print(table(results, args.tasks, args.methods, args.truncations, args.seeds,
                args.input_window, args.until_stalled))
    if args.figure:
        from experiment.figures import draw_length_curves

        folders = [results / run_name(task, m, t, 0) for task in args.tasks
                   for t in args.truncations for m in runs_at(t, args.methods)]
        draw_length_curves([f for f in folders if (f / "metrics.csv").exists()], args.figure)


if __name__ == "__main__":
    run(main)
