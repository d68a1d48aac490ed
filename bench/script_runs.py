"""Run a training script in its own run folder, or read its finished run back: the benches'
way of making a table from real script runs that survive interruption (an interrupted run
resumes from its checkpoint the next time)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from experiment.cli import positive_int
from experiment.errors import ScriptFailed

ROOT = Path(__file__).resolve().parent.parent
# a Python exception's last line, or a script's one `error:` line (after torchrun's [rankN]:)
ERROR_LINE = re.compile(r"(^|\]: )(error: |[\w.]*(Error|Exception): )")
ECHOES = ("Connection closed by peer", "ChildFailedError", "Connection reset by peer")


class StopsPassedOn:
    """SIGTERM sent to a bench, passed on to the scripts it is running (each saves its
    checkpoint after its step and stops); after it or SIGINT, no script starts. SIGINT is not
    passed on: a terminal's Ctrl-C reaches every process of its group, the scripts included,
    and a copy of a second Ctrl-C would reach a script after it had already stopped."""

    def __init__(self):
        self.signum: int | None = None
        self.children: set[subprocess.Popen] = set()

    def handle(self, signum, frame) -> None:
        """The signal handler: remember the first stop, pass each SIGTERM on."""
        if self.signum is None:
            self.signum = signum
        if signum == signal.SIGTERM:
            for child in list(self.children):
                child.send_signal(signum)

    def start(self, argv: list[str], **popen) -> subprocess.Popen | None:
        """Popen(argv), refused (None) once a stop was asked for; a stop that comes while
        it starts reaches it too."""
        if self.signum is not None:
            return None
        child = subprocess.Popen(argv, **popen)
        self.children.add(child)
        if self.signum == signal.SIGTERM:
            child.send_signal(self.signum)
        return child

    def finished(self, child: subprocess.Popen) -> None:
        """Forget a child that has ended."""
        self.children.discard(child)


STOPS = StopsPassedOn()


@contextmanager
def stops_passed_on():
    """While the bench runs its scripts, a signal to it goes to them (signal handlers can only
    be set from the main thread; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, STOPS.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        STOPS.signum = None


def finished_summary(out: Path) -> dict | None:
    """The summary of the finished run in `out`, or None while it is unfinished or absent."""
    summary = out / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else None


def failure_line(stderr: str) -> str:
    """What a failed run says of why, in one line: the first error it raised or printed that
    is not another process's failure (under torchrun a rank's error ends its peers with errors
    of their own), else the end of what it printed."""
    errors = [line.strip() for line in stderr.splitlines() if ERROR_LINE.search(line)]
    causes = [line for line in errors if not any(echo in line for echo in ECHOES)]
    return ((causes or errors)[0] if causes or errors else stderr[-300:].strip())[:200]


def script_run(command: list[str], out: Path, label: str | None = None) -> dict:
    """The summary of `command` (a script and its flags, e.g. ["mlp.py", "--depth", "4"]) run
    with --out `out` on the CPU: read back when finished, resumed when a checkpoint is there,
    started otherwise. With a `label`, the script runs on one thread and each line it prints
    is prefixed with the label (several runs at once, `script_runs`)."""
    finished = finished_summary(out)
    if finished is not None:
        return finished
    if (out / "checkpoint.pt").exists():
        argv = [sys.executable, command[0], "--resume", str(out)]
    else:
        argv = [sys.executable, *command, "--out", str(out), "--device", "cpu"]
    prefix = "" if label is None else f"[{label}] "
    if label is None:
        popen = {}
    else:
        # one thread each: OpenMP threads of runs that share the cores wait on each other
        popen = {"env": {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                 "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    child = STOPS.start(argv, cwd=ROOT, **popen)
    if child is None:  # the bench was asked to stop before this run began
        raise ScriptFailed(command, 128 + STOPS.signum, out, started=False)
    try:
        print(f"{prefix}$", " ".join(argv[1:]), flush=True)
        with child:
            for line in child.stdout or ():
                print(prefix + line, end="", flush=True)
            status = child.wait()
    finally:
        STOPS.finished(child)
    if status:
        raise ScriptFailed(command, status, out)
    return json.loads((out / "summary.json").read_text())


def script_runs(runs: list[tuple[list[str], Path]], jobs: int = 1) -> list[dict]:
    """The summaries of `script_run(command, out)` for each (command, out) of `runs`, in order:
    one after another when `jobs` is 1, else up to `jobs` at once, each on one thread with its
    lines prefixed by its folder's name. Ctrl-C, or SIGTERM to the bench, stops the running
    scripts (each saves its checkpoint) and starts no more."""
    with stops_passed_on():
        if jobs == 1:
            return [script_run(command, out) for command, out in runs]
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(script_run, command, out, out.name) for command, out in runs]
            return [future.result() for future in futures]


def add_jobs_argument(parser, engine: str = "") -> None:
    """--jobs, runs at once for `script_runs` (`engine`: the help's prefix where only one
    engine uses it)."""
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help=f"{engine}runs at once, each on one thread (1: one after another, "
                             "on the threads torch chooses)")


def threads_note(jobs: int) -> str:
    """How the runs use the CPU's threads, for a bench's first line."""
    return (f"{jobs} runs at once, one thread each" if jobs > 1
            else f"{torch.get_num_threads()} threads")
