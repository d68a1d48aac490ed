"""Where a recurrent DNI curriculum sits on one length for many steps, what the synthetic
gradient's cosine did: on the plateau, and in its last steps before the length grew. Reads the
records of finished rnn_tasks.py runs (metrics.csv's sg_cos, logged every --log-every steps, and
summary.json's levels); trains nothing.

Usage: python bench/probes/rnn_plateaus.py DIR [DIR ...] [--min-steps N] [--before N]
A DIR is a run folder or a folder of them (bench/rnn.py's --results). Only the paper's S counts:
BPTT runs, and runs whose S also sees inputs (--synth-input-window), are skipped. A plateau is
a gap of at least --min-steps between two growths (the stretch after the last growth has no end
to compare with and is left out); it is a first crossing when its length is the shortest whose
sequences run past the first chunk edge (copy: 2N + 1 steps longer than T).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch

from experiment.cli import Parser, positive_int, run
from experiment.errors import UserError
from experiment.figures import load_run
from experiment.sequence_tasks import make_task

SETTLE = 1_000      # steps after a growth left out of the plateau's mean (the new length's start)
ROSE = 0.01         # the least change in the mean cosine counted as a rise or a fall


@dataclass
class Plateau:
    """One stretch of a run at one length: its steps, and the cosine's mean over it and over
    its last `before` steps."""

    run: str
    length: int
    start: int
    end: int
    cosine: float
    cosine_before_growth: float
    first_crossing: bool


def plateaus(levels: list, cosines: list[tuple[int, float]], min_steps: int,
             before: int) -> list[tuple[int, int, int, float, float]]:
    """(length, start, end, mean cosine from start + SETTLE to end - before, mean over the last
    `before` steps) for every gap of at least `min_steps` between growths ([step, new length]
    each) that has cosines logged in both stretches."""
    found = []
    for (start, length), (end, _) in pairwise(levels):
        if end - start < min_steps:
            continue
        on = [c for step, c in cosines if start + SETTLE <= step < end - before]
        last = [c for step, c in cosines if end - before <= step < end]
        if on and last:
            found.append((length, start, end, statistics.mean(on), statistics.mean(last)))
    return found


def first_crossing_length(task_name: str, truncation: int, task_flags: dict,
                          max_length: int = 64) -> int | None:
    """The shortest length up to `max_length` whose sequences are longer than one chunk (the
    copy tasks' sequences have one length a level; None for untruncated runs or none)."""
    if truncation <= 0:
        return None
    task = make_task(task_name, **task_flags)
    generator = torch.Generator().manual_seed(0)
    for length in range(1, max_length + 1):
        if task.sample(length, 1, generator, "cpu").inputs.shape[0] > truncation:
            return length
    return None


def run_folders(paths: list[str]) -> list[Path]:
    """The run folders (those with a summary.json) given or inside the folders given."""
    folders = []
    for path in map(Path, paths):
        if (path / "summary.json").exists():
            folders.append(path)
        elif path.is_dir():
            folders += sorted(p.parent for p in path.glob("*/summary.json"))
        else:
            raise UserError(f"{path}: not a folder")
    if not folders:
        raise UserError(f"no finished run (summary.json) in {' '.join(paths)}")
    return folders


def read_record(path: Path, read: Callable[[Path], Any]) -> Any:
    """`read(path)`, its failures one UserError naming the file and what is wrong with it."""
    try:
        return read(path)
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except KeyError as exc:
        raise UserError(f"{path}: no {exc.args[0]!r} field") from None
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: unreadable ({str(exc).splitlines()[0][:120]})") from None


def run_plateaus(folder: Path, min_steps: int, before: int) -> list[Plateau]:
    """The plateaus of the run in `folder` (none for BPTT, or an S that sees inputs)."""
    summary = read_record(folder / "summary.json", lambda p: json.loads(p.read_text()))
    args = read_record(folder / "config.json", lambda p: json.loads(p.read_text())["args"])
    if summary.get("method") == "bptt" or args.get("synth_input_window", 0):
        return []
    cosines = [(int(row["step"]), row["sg_cos"]) for row in load_run(folder).steps
               if "sg_cos" in row]
    task, truncation, found = read_record(
        folder / "summary.json", lambda p: (summary["task"], int(summary["truncation"]),
                                            plateaus(summary["levels"], cosines, min_steps,
                                                     before)))
    if not found:
        return []
    flags = {key: args[key] for key in ("bits", "max_repeats") if key in args}
    crossing = first_crossing_length(task, truncation, flags, args.get("max_length", 64))
    return [Plateau(folder.name, length, start, end, on, last, length == crossing)
            for length, start, end, on, last in found]


def report(found: list[Plateau], before: int) -> str:
    """A row a plateau, then per kind (first crossing or later) the cosines' medians and how
    many rose before the growth."""
    lines = [f"| run | length | steps | cosine on it | last {before:,} steps |",
             "|---|---|---|---|---|"]
    lines += [f"| {p.run} | {p.length}{' (first crossing)' if p.first_crossing else ''} | "
              f"{p.start:,} to {p.end:,} | {p.cosine:.3f} | {p.cosine_before_growth:.3f} |"
              for p in found]
    lines.append("")
    for name, kind in (("first crossing", True), ("later", False)):
        group = [p for p in found if p.first_crossing == kind]
        if not group:
            continue
        rose = sum(p.cosine_before_growth - p.cosine >= ROSE for p in group)
        fell = sum(p.cosine - p.cosine_before_growth >= ROSE for p in group)
        lines.append(
            f"{name}: plateaus {len(group)}, of {min(p.end - p.start for p in group):,} to "
            f"{max(p.end - p.start for p in group):,} steps; cosine median "
            f"{statistics.median(p.cosine for p in group):.3f} on them, "
            f"{statistics.median(p.cosine_before_growth for p in group):.3f} in their last "
            f"{before:,} steps; it rose by {ROSE} or more in {rose}, fell by as much in {fell}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the plateaus of the runs given and the cosine on them."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", metavar="DIR",
                        help="run folders, or folders of them (bench/rnn.py's --results)")
    parser.add_argument("--min-steps", type=positive_int, default=10_000,
                        help=f"the fewest steps between growths that make a plateau, more than "
                             f"--before + {SETTLE} (default: 10000)")
    parser.add_argument("--before", type=positive_int, default=5_000,
                        help="the steps before a growth whose cosine is compared with the "
                             "plateau's (default: 5000)")
    args = parser.parse_args(argv)
    if args.min_steps <= SETTLE + args.before:
        parser.error(f"--min-steps must be more than --before + {SETTLE}, the steps after a "
                     f"growth that are not the plateau's")
    found = [p for folder in run_folders(args.folders)
             for p in run_plateaus(folder, args.min_steps, args.before)]
    if not found:
        raise UserError(f"no plateau of {args.min_steps:,} steps or more in these runs")
    print(report(found, args.before))


if __name__ == "__main__":
    run(main)
