"""Run records, figures, checkpoints and exact resume, through the scripts."""

import csv
import json
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT

SMALL = ["--train-size", "600", "--batch-size", "50", "--device", "cpu", "--log-every", "3",
         "--seed", "7"]


def final_weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_records_written(run_script, tmp_path):
    result = run_script("main.py", *SMALL, "--epochs", "2", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["args"]["epochs"] == 2 and config["torch"] == torch.__version__
    assert "git_commit" in config and config["device"] == "cpu"
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [int(r["step"]) for r in steps] == list(range(0, 24, 3))
    assert len(epochs) == 2 and float(epochs[-1]["test_acc"]) > 0.3
    assert all(r["sg_loss3"] and r["cos3"] and r["train_loss"] for r in steps)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert payload["state"]["epoch"] == 3 and payload["state"]["step"] == 24


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_figures_from_dni_and_baseline_runs(run_script, tmp_path):
    a, b, figures = tmp_path / "A", tmp_path / "B", tmp_path / "F"
    assert run_script("main.py", *SMALL, "--epochs", "2", "--out", a).returncode == 0
    assert run_script("mlp.py", *SMALL, "--epochs", "2", "--out", b).returncode == 0
    result = run_script("misc/plot.py", a, b, "--out", figures)
    assert result.returncode == 0, result.stderr
    assert png_size(figures / "classify_loss.png") == (700, 450)
    assert png_size(figures / "grad_loss.png") == (700, 450)
    assert png_size(figures / "grad_cosine.png") == (700, 450)
    assert png_size(figures / "test_acc.png") == (1100, 450)
    assert run_script("misc/plot.py", tmp_path / "nothing").returncode != 0


def test_baseline_flag_draws_figures(run_script, tmp_path):
    b = tmp_path / "B"
    assert run_script("mlp.py", *SMALL, "--epochs", "1", "--out", b).returncode == 0
    result = run_script("main.py", *SMALL, "--epochs", "1", "--out", tmp_path / "A",
                        "--baseline", b)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "A" / "test_acc.png").exists()


@pytest.mark.parametrize("script, extra", [
    ("main.py", ["--conditioned"]),
    ("mlp.py", []),
])
def test_resume_after_each_epoch_equals_uninterrupted(run_script, tmp_path, script, extra):
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert run_script(script, *SMALL, *extra, "--epochs", "3", "--out", full).returncode == 0
    assert run_script(script, *SMALL, *extra, "--epochs", "1", "--out", parts).returncode == 0
    for epochs in ("2", "3"):  # a larger --epochs beside --resume overrides the saved flag
        result = run_script(script, "--resume", parts, "--epochs", epochs)
        assert result.returncode == 0, result.stderr
    # the cosine schedule depends on --epochs, so compare where the schedules agree: this
    # checks that resuming keeps every state; the SIGTERM test checks mid-epoch exactness
    summary = json.loads((parts / "summary.json").read_text())
    assert summary["epochs"] == 3 and len(summary["history"]) == 3
    assert json.loads((parts / "config.json").read_text())["args"]["epochs"] == 3


def start(argv):
    return subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_rows(path, rows, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) > rows:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("run made no progress")


@pytest.mark.parametrize("script, extra, rows", [
    ("main.py", [], 7),      # in epoch 2 (12 steps an epoch, a row every 3)
    ("cnn.py", ["--channels", "4", "8"], 2),      # early in epoch 1
])
def test_sigterm_mid_run_then_resume_is_bit_identical(run_script, tmp_path, script, extra, rows):
    full, cut = tmp_path / "full", tmp_path / "cut"
    argv = [script, *SMALL, *extra, "--epochs", "3"]
    assert run_script(*argv, "--out", full).returncode == 0
    proc = start([*argv, "--out", cut])
    wait_for_rows(cut / "metrics.csv", rows, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume" in err
    result = run_script(script, "--resume", cut)
    assert result.returncode == 0, result.stderr
    assert same_weights(final_weights(full), final_weights(cut))
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    for key in ("test_acc", "test_loss", "train_loss"):
        assert a[key] == b[key]
    assert rows_without_wall_time(full) == rows_without_wall_time(cut)


def rows_without_wall_time(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [row[:3] + row[4:] for row in csv.reader(f)]


def test_divergence_stops_with_one_line_and_keeps_the_checkpoint(run_script, tmp_path):
    assert run_script("main.py", *SMALL, "--epochs", "1", "--out", tmp_path).returncode == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    result = run_script("main.py", "--resume", tmp_path, "--epochs", "3", "--lr", "1e30",
                        "--synth-lr", "1e30")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training diverged: non-finite")
    assert "at step" in lines[0] and "checkpoint stays" in lines[0]
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_a_refused_resume_leaves_metrics_csv_as_it_was(run_script, tmp_path):
    """A checkpoint that does not fit the model is refused before the run's records are
    touched: metrics.csv keeps even the rows written after the checkpoint."""
    dni, bp = tmp_path / "dni", tmp_path / "bp"
    assert run_script("main.py", *SMALL, "--epochs", "1", "--out", dni).returncode == 0
    assert run_script("mlp.py", *SMALL, "--epochs", "1", "--out", bp).returncode == 0
    (dni / "checkpoint.pt").write_bytes((bp / "checkpoint.pt").read_bytes())
    with open(dni / "metrics.csv", "a") as f:
        f.write("step,99,2,1.0,0.5,,,,,,,,\n")          # a row past the checkpoint
    before = (dni / "metrics.csv").read_bytes()
    result = run_script("main.py", "--resume", dni)
    assert result.returncode == 2 and "does not fit this model" in result.stderr
    assert (dni / "metrics.csv").read_bytes() == before
