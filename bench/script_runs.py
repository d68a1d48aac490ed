"""Run a training script in its own run folder, or read its finished run back: the benches'
way of making a table from real script runs that survive interruption (an interrupted run
resumes from its checkpoint the next time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def finished_summary(out: Path) -> dict | None:
    """The summary of the finished run in `out`, or None while it is unfinished or absent."""
    summary = out / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else None


def script_run(command: list[str], out: Path) -> dict:
    """The summary of `command` (a script and its flags, e.g. ["mlp.py", "--depth", "4"]) run
    with --out `out` on the CPU: read back when finished, resumed when a checkpoint is there,
    started otherwise."""
    finished = finished_summary(out)
    if finished is not None:
        return finished
    if (out / "checkpoint.pt").exists():
        argv = [sys.executable, command[0], "--resume", str(out)]
    else:
        argv = [sys.executable, *command, "--out", str(out), "--device", "cpu"]
    print("$", " ".join(argv[1:]), flush=True)
    subprocess.run(argv, cwd=ROOT, check=True)
    return json.loads((out / "summary.json").read_text())
