"""SIGINT and SIGTERM at chosen moments of a run (the first step, evaluation, a checkpoint
write, a second signal inside the file write, the figures at the end, a step drawn at
random): after each, --resume ends bit-identical to the uninterrupted run, and no
checkpoint is left half-written. (The pipeline's cases are in test_pipeline_train.py.)"""

import csv
import json
import random
import signal
from functools import partial

import pytest
import torch

from tests.conftest import run_python

MAIN = ["main.py", "--train-size", "600", "--batch-size", "50", "--device", "cpu",
        "--log-every", "3", "--seed", "7", "--epochs", "3"]      # 12 steps an epoch
RNN = ["rnn_tasks.py", "--steps", "12", "--batch-size", "4", "--hidden", "8", "--device", "cpu",
       "--threads", "1", "--log-every", "4", "--checkpoint-every", "4", "--truncation", "2"]
RANDOM_CALL = random.Random(2026).randrange(2, 60)  # some cross-entropy call of the run


run = partial(run_python, timeout=240)


def interrupted(moment, signame, argv):
    return run("tests/signal_at.py", moment, signame, *argv)


@pytest.fixture(scope="module")
def references(tmp_path_factory, mnist_root):
    """Uninterrupted main.py (with figures against an mlp.py run) and rnn_tasks.py runs."""
    root = tmp_path_factory.mktemp("reference")
    baseline = run("mlp.py", *MAIN[1:], "--epochs", "1", "--out", root / "mlp")
    assert baseline.returncode == 0, baseline.stderr
    for name, argv in (("main", [*MAIN, "--baseline", root / "mlp"]), ("rnn", RNN)):
        done = run(*argv, "--out", root / name)
        assert done.returncode == 0, done.stderr
    return root


def rows_without_time(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "wall_seconds"}
                for row in csv.DictReader(f)]


def assert_same_end(out, reference, keys):
    got = json.loads((out / "summary.json").read_text())
    want = json.loads((reference / "summary.json").read_text())
    for key in keys:
        assert got[key] == want[key], key
    assert rows_without_time(out) == rows_without_time(reference)
    a = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(reference / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out.glob(".*.tmp")), "a temporary file stays"


# moment, signal, the interrupted run's exit status (-15: killed by SIGTERM's default action,
# outside the training loop) and what its last line says
MAIN_CASES = [
    ("step:1", "SIGINT", 130, "stopped by SIGINT in epoch 1 after step 1"),
    ("step:1", "SIGTERM", 143, "stopped by SIGTERM in epoch 1 after step 1"),
    ("evaluate:1", "SIGTERM", 143, "stopped by SIGTERM in epoch 1 after step 12"),
    ("evaluate:2", "SIGINT", 130, "stopped by SIGINT in epoch 2 after step 24"),
    ("checkpoint:1", "SIGINT", 130, "stopped by SIGINT in epoch 1 after step 12"),
    ("checkpoint-write:2", "SIGTERM", 130, "interrupted"),   # the second signal: at once
    ("figures:1", "SIGINT", 130, "interrupted"),
    ("figures:1", "SIGTERM", -15, None),
    (f"step:{RANDOM_CALL}", "SIGTERM", 143, "stopped by SIGTERM"),
]


@pytest.mark.parametrize("moment, signame, code, says", MAIN_CASES)
def test_main_interrupted_then_resumed_ends_bit_identical(references, tmp_path, moment,
                                                          signame, code, says):
    out = tmp_path / "run"
    cut = interrupted(moment, signame, [*MAIN, "--baseline", references / "mlp", "--out", out])
    assert cut.returncode == code, cut.stderr
    if says is not None:
        assert cut.stderr.strip().splitlines()[-1].startswith(says), cut.stderr
    assert "Traceback" not in cut.stderr
    if moment == "checkpoint-write:2":  # the write it cut left the first checkpoint whole
        payload = torch.load(out / "checkpoint.pt", weights_only=True)
        assert payload["state"]["step"] == 12
    done = run("main.py", "--resume", out)
    assert done.returncode == 0, done.stderr
    assert_same_end(out, references / "main", ("test_acc", "test_loss", "train_loss", "cos1",
                                               "sg_loss3"))
    assert (out / "test_acc.png").exists()


def test_a_sigint_test_does_not_depend_on_how_the_suite_was_started(references, tmp_path):
    """Started with SIGINT ignored, as a shell's background job (`pytest &` in a script) is,
    the driver still gives its script a SIGINT that stops it at the figures."""
    out = tmp_path / "run"
    argv = ["tests/signal_at.py", "figures:1", "SIGINT", *MAIN, "--epochs", "1",
            "--baseline", references / "mlp", "--out", out]
    cut = run(*argv, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert cut.returncode == 130, cut.stderr
    assert cut.stderr.strip().splitlines()[-1] == "interrupted"


RNN_CASES = [
    ("step:1", "SIGINT", 130),
    ("checkpoint:2", "SIGTERM", 143),
    ("log:2", "SIGINT", 130),
    ("checkpoint-write:2", "SIGTERM", 130),
]


@pytest.mark.parametrize("moment, signame, code", RNN_CASES)
def test_rnn_interrupted_then_resumed_ends_bit_identical(references, tmp_path, moment,
                                                         signame, code):
    out = tmp_path / "run"
    cut = interrupted(moment, signame, [*RNN, "--out", out])
    assert cut.returncode == code, cut.stderr
    assert "Traceback" not in cut.stderr and len(cut.stderr.strip().splitlines()) == 1
    done = run("rnn_tasks.py", "--resume", out)
    assert done.returncode == 0, done.stderr
    assert_same_end(out, references / "rnn", ("max_length_solved", "steps", "levels"))


def test_the_signal_driver_refuses_an_unknown_moment():
    assert interrupted("lunch", "SIGINT", MAIN).returncode != 0
