"""main.py as a pipeline of processes (experiment/pipeline_train.py): accuracy against one
process, exact resume after a signal, and a dead or silent stage ending the others in time."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT

FLAGS = ["--model_type", "mlp", "--train-size", "4096", "--batch-size", "64", "--epochs", "2",
         "--log-every", "4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv, world=2, **popen):
    """Start main.py once per rank as torchrun would (its environment variables), so the test
    holds every stage's process."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world)}
        procs.append(subprocess.Popen([sys.executable, "main.py", *map(str, argv)], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, **popen))
    return procs


def torchrun(argv, world=2, timeout=300):
    """Run main.py under torchrun and return the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(world), "main.py", *map(str, argv)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def wait_for_steps(run_dir, rows=3, timeout=120):
    """Block until metrics.csv holds `rows` step rows (training is under way)."""
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.csv"
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\nstep,") >= rows:
            return
        time.sleep(0.1)
    raise AssertionError("training did not start")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mnist_root):
    """A 2-stage run to completion (the reference for the tests below)."""
    out = tmp_path_factory.mktemp("pipe") / "run"
    done = torchrun([*FLAGS, "--out", out])
    assert done.returncode == 0, done.stderr[-2000:]
    return out, json.loads((out / "summary.json").read_text()), done


def test_two_stages_train_within_2_points_of_one_process(uninterrupted, run_script, tmp_path):
    out, summary, done = uninterrupted
    assert summary["processes"] == 2 and summary["stages"] == [1, 3]
    assert summary["method"] == "dni" and summary["samples_per_s"] > 0
    assert [t["rank"] for t in summary["stage_times"]] == [0, 1]
    for t in summary["stage_times"]:
        assert t["total_s"] >= t["wait_s"] + t["comm_s"] and t["compute_s"] > 0
    assert sorted(p.name for p in out.glob("checkpoint-stage*.pt")) == [
        "checkpoint-stage0.pt", "checkpoint-stage1.pt"]
    assert done.stdout.count("epoch ") == 2  # one line per epoch, from the last stage only
    one = run_script("main.py", *FLAGS, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    single = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["test_acc"] > 0.7  # it learned (4096 examples, 2 epochs)
    assert abs(summary["test_acc"] - single["test_acc"]) <= 0.02


def test_sigterm_to_one_stage_stops_all_and_resume_is_exact(uninterrupted, tmp_path):
    """SIGTERM to the last stage only: the stop travels down the pipeline, every stage saves
    (pending synthesizer updates included) and exits 143; --resume then ends exactly where
    the uninterrupted run ended."""
    _, reference, _ = uninterrupted
    out = tmp_path / "run"
    procs = launch([*FLAGS, "--out", out])
    wait_for_steps(out, rows=5)
    procs[1].send_signal(signal.SIGTERM)
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [143, 143], results
    assert "continue with --resume" in results[1][1]
    assert results[0][1].strip() == ""  # one stage reports it
    assert summary_missing(out)
    done = torchrun(["--resume", out])
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("test_acc", "test_loss", "train_loss", "sg_loss1", "sg_loss2", "sg_loss3"):
        assert summary[key] == reference[key], key
    assert rows_without_time(out) == rows_without_time(uninterrupted[0])
    for rank in (0, 1):
        got = torch.load(out / f"checkpoint-stage{rank}.pt")["model"]
        want = torch.load(uninterrupted[0] / f"checkpoint-stage{rank}.pt")["model"]
        for name, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[name], value), name


def rows_without_time(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "wall_seconds"}
                for row in csv.DictReader(f)]


def summary_missing(out) -> bool:
    return not (out / "summary.json").exists()


def test_killed_stage_ends_the_other_with_one_line_in_time(tmp_path, mnist_root):
    out = tmp_path / "run"
    procs = launch([*FLAGS, "--epochs", "20", "--out", out])
    wait_for_steps(out)
    procs[1].kill()
    start = time.monotonic()
    _, err = procs[0].communicate(timeout=60)
    assert time.monotonic() - start < 60
    assert procs[0].returncode == 1
    assert err.strip().splitlines() == [err.strip().splitlines()[-1]]
    assert err.startswith("error: stage 0: stage 1 is not answering"), err
    procs[1].communicate()


def test_silent_stage_times_out(tmp_path, mnist_root):
    """A stage that stops answering without dying (SIGSTOP) ends the other after --timeout."""
    out = tmp_path / "run"
    procs = launch([*FLAGS, "--epochs", "20", "--timeout", "4", "--out", out])
    wait_for_steps(out)
    procs[1].send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        assert time.monotonic() - start < 30
        assert procs[0].returncode == 1
        assert err.startswith("error: stage 0: stage 1 is not answering: no message for 4s"), err
    finally:
        procs[1].kill()
        procs[1].communicate()


@pytest.mark.parametrize("argv,world,message", [
    (["--stages", "1", "1"], 2, "error: --stages: stage sizes [1, 1] must be positive and sum"),
    (["--depth", "1"], 3, "error: --stages: cannot split 2 blocks into 3 stages"),
])
def test_bad_stages_give_one_error_line(argv, world, message, tmp_path, mnist_root):
    procs = launch([*FLAGS, *argv, "--out", tmp_path / "run"], world=world)
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    errors = [line for _, err in results for line in err.splitlines()]
    assert len(errors) == 1 and errors[0].startswith(message), results


@pytest.mark.parametrize("rank, ranks, cores, expected", [
    (0, 2, [0, 1], [0]),
    (1, 2, [0, 1], [1]),
    (1, 2, [4, 5, 6, 7], [6, 7]),
    (2, 3, [0, 1], None),          # fewer cores than ranks: left as it is
])
def test_each_local_rank_gets_its_own_cores(monkeypatch, rank, ranks, cores, expected):
    import os

    from experiment.pipeline_train import pin_to_cores

    pinned = []
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cores), raising=False)
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, mine: pinned.append(list(mine)),
                        raising=False)
    assert pin_to_cores() == expected
    assert pinned == ([] if expected is None else [expected])
