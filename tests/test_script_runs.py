"""bench/script_runs.py: several script runs at once, each line labelled with its run, read
back once finished, and a failed run reported."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from bench.script_runs import script_runs
from experiment.cli import run
from experiment.errors import ScriptFailed
from tests.conftest import ROOT

TINY = ["--epochs", "1", "--train-size", "256", "--batch-size", "64"]


def test_runs_at_once_are_labelled_then_read_back(mnist_root, tmp_path, capsys):
    runs = [(["mlp.py", *TINY, "--data-dir", str(mnist_root), "--seed", str(seed)],
             tmp_path / f"seed{seed}") for seed in (0, 1)]
    first = script_runs(runs, jobs=2)
    printed = capsys.readouterr().out.splitlines()
    assert [s["seed"] for s in first] == [0, 1]          # in the order asked, not of finishing
    for seed in (0, 1):
        lines = [line for line in printed if line.startswith(f"[seed{seed}] ")]
        assert lines[0].startswith(f"[seed{seed}] $ mlp.py") and len(lines) > 1
    assert all(line.startswith("[seed") for line in printed)
    again = script_runs(runs, jobs=2)                     # finished: read back, nothing runs
    assert again == first and capsys.readouterr().out == ""


def test_a_failed_run_raises_after_the_others(mnist_root, tmp_path):
    good = (["mlp.py", *TINY, "--data-dir", str(mnist_root)], tmp_path / "good")
    bad = (["mlp.py", "--epochs", "0"], tmp_path / "bad")
    with pytest.raises(ScriptFailed) as failed:
        script_runs([bad, good], jobs=2)
    assert (tmp_path / "good" / "summary.json").exists()
    assert failed.value.exit_code == 2 and str(tmp_path / "bad") in str(failed.value)


def test_a_bench_whose_script_failed_says_so_in_one_line(capsys):
    def bench():
        raise ScriptFailed(["main.py", "--epochs", "3"], -15, "runs/x")

    with pytest.raises(SystemExit) as stopped:
        run(bench)
    assert stopped.value.code == 128 + 15
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("main.py for runs/x ended with exit status 143")


BENCH = """
import sys
from pathlib import Path
from bench.script_runs import script_runs
from experiment.cli import run
out, data, jobs = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
tiny = ["--train-size", "256", "--batch-size", "64", "--epochs", "100000", "--data-dir", data]
run(lambda: script_runs([(["mlp.py", *tiny], out / name) for name in "abc"], jobs=jobs))
"""


@pytest.mark.parametrize("jobs, signum, to_group", [
    (1, signal.SIGTERM, False), (2, signal.SIGTERM, False), (2, signal.SIGINT, True)])
def test_a_signal_to_the_bench_reaches_its_scripts(mnist_root, tmp_path, jobs, signum, to_group):
    """SIGTERM sent to the bench alone, or SIGINT to its whole process group as a terminal's
    Ctrl-C is: each running script stops after its step, saying so, no further script starts,
    the bench exits 128 + the signal's number in one line, and nothing prints a traceback."""
    bench = subprocess.Popen([sys.executable, "-c", BENCH, str(tmp_path), str(mnist_root),
                              str(jobs)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    watchdog = threading.Timer(180, os.killpg, (bench.pid, signal.SIGKILL))
    watchdog.start()                           # a bench that never gets going fails, not hangs
    try:
        running = ["a", "b"][:jobs]
        seen, lines = set(), []
        for line in bench.stdout:              # wait until each running script is in its epochs
            lines.append(line)
            started = re.match(r"(\[(\w)\] )?epoch +2/", line)
            if started:
                seen.add(started.group(2) or "a")
            if len(seen) == jobs:
                break
        assert len(seen) == jobs, "".join(lines)
        if to_group:
            os.killpg(bench.pid, signum)
        else:
            bench.send_signal(signum)
        rest, err = bench.communicate(timeout=120)
        printed = "".join(lines) + rest + err
        assert bench.returncode == 128 + signum, err
        assert printed.count(f"stopped by {signal.Signals(signum).name}") == jobs, printed
        assert "Traceback" not in printed
        for name in running:
            assert not (tmp_path / name / "summary.json").exists()
        assert not (tmp_path / "c").exists()
        last = err.splitlines()[-1]
        assert last.startswith(f"mlp.py for {tmp_path / 'a'} ended with exit status "
                               f"{128 + signum} ")
    finally:
        watchdog.cancel()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bench.pid, signal.SIGKILL)    # nothing left running when it fails
