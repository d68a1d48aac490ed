"""bench/script_runs.py: several script runs at once, each line labelled with its run, read
back once finished, and a failed run reported."""

import pytest

from bench.script_runs import script_runs
from experiment.cli import run
from experiment.errors import ScriptFailed

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
