"""main.py as a pipeline of processes (experiment/pipeline_train.py): accuracy against one
process, exact resume after a signal, and a dead or silent stage ending the others in time."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, free_port, launch, torchrun

FLAGS = ["--model_type", "mlp", "--train-size", "4096", "--batch-size", "64", "--epochs", "2",
         "--log-every", "4"]


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
    """The default pipeline (edge interfaces) against its one-process twin, whose only
    interface sits where the stages meet."""
    out, summary, done = uninterrupted
    assert summary["processes"] == 2 and summary["stages"] == [1, 3]
    assert summary["interface_mode"] == "edges" and summary["interfaces_after"] == [1]
    assert summary["method"] == "dni" and summary["samples_per_s"] > 0
    assert "sg_loss1" in summary and "sg_loss2" not in summary
    assert [t["rank"] for t in summary["stage_times"]] == [0, 1]
    for t in summary["stage_times"]:
        assert t["total_s"] >= t["wait_s"] + t["comm_s"] and t["compute_s"] > 0
    assert sorted(p.name for p in out.glob("checkpoint-stage*.pt")) == [
        "checkpoint-stage0.pt", "checkpoint-stage1.pt"]
    assert done.stdout.count("epoch ") == 2  # one line per epoch, from the last stage only
    one = run_script("main.py", *FLAGS, "--interfaces-at", "1", "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    single = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert single["interfaces"] == ["0"]
    assert summary["test_acc"] > 0.8  # it learned (4096 examples, 2 epochs)
    assert abs(summary["test_acc"] - single["test_acc"]) <= 0.02


def test_staleness_0_rows_equal_one_process_with_interfaces_at_the_cut(run_script, tmp_path,
                                                                    monkeypatch):
    """At staleness 0 the pipeline's metrics.csv equals its one-process twin's row for row:
    each logged step's sg_loss1 is that step's fit (not the step before's), the cosine to the
    true gradient (cos1) is measured on the same steps with the same value, and the epoch
    rows hold the same means. The twin runs on one thread, as torchrun starts each stage: two
    threads sum in another order, and DNI's bootstrap grows that difference past 1e-5."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    flags = ["--model_type", "mlp", "--train-size", "1024", "--batch-size", "64",
             "--epochs", "1", "--log-every", "3"]
    done = torchrun([*flags, "--staleness", "0", "--out", tmp_path / "pipe"])
    assert done.returncode == 0, done.stderr[-2000:]
    one = run_script("main.py", *flags, "--interfaces-at", "1", "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    got, want = rows_without_time(tmp_path / "pipe"), rows_without_time(tmp_path / "one")
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
    close = {"rel": 1e-5, "abs": 1e-7}
    for g, w in zip(got, want):   # first the synthesizer loss: each step's own fit
        assert number(g["sg_loss1"]) == pytest.approx(number(w["sg_loss1"]), **close), (g, w)
    assert len(got) == 7 and all(r.get("cos1") for r in got)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            if key in ("kind", "step", "epoch") or w[key] == "":
                assert g[key] == w[key], (key, g, w)
            else:
                assert float(g[key]) == pytest.approx(float(w[key]), **close), key


def test_all_interfaces_pipeline_matches_one_process_dni(run_script, tmp_path, mnist_root):
    """--interfaces all: a synthesizer after every block, as one-process main.py has them."""
    done = torchrun([*FLAGS, "--interfaces", "all", "--out", tmp_path / "pipe"])
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    assert summary["interface_mode"] == "all" and summary["interfaces_after"] == [1, 2, 3]
    assert all(f"sg_loss{i}" in summary for i in (1, 2, 3))
    one = run_script("main.py", *FLAGS, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    single = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert single["interfaces"] == ["0", "1", "2"]
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
    assert_same_end(out, uninterrupted[0], reference, 2)


@pytest.mark.parametrize("rank, moment, signame, codes", [
    (0, "step:1", "SIGINT", [130, 130]),          # the first step, on stage 0
    (1, "evaluate:1", "SIGTERM", [143, 143]),     # evaluation, on the last stage
    (0, "checkpoint:1", "SIGINT", [130, 130]),    # a checkpoint write, on stage 0
    # too late to stop a step: the run ends whole and saved, with the signal's status
    (1, "step:128", "SIGTERM", [143, 143]),       # the last step, on the last stage
    (0, "evaluate:2", "SIGTERM", [143, 143]),     # the final evaluation, on stage 0
])
def test_signal_at_a_moment_then_resume_is_exact(uninterrupted, tmp_path, rank, moment,
                                                 signame, codes):
    """A signal to one stage at a chosen moment: every stage stops and saves, one says how to
    resume, and --resume ends exactly as the uninterrupted run."""
    reference_dir, reference, _ = uninterrupted
    out = tmp_path / "run"
    procs = launch([*FLAGS, "--out", out],
                   wrap={rank: ["tests/signal_at.py", moment, signame]})
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == codes, results
    lines = [line for _, err in results for line in err.strip().splitlines()]
    assert len(lines) == 1 and "continue with --resume" in lines[0], results
    done = torchrun(["--resume", out])
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_end(out, reference_dir, reference, 2)


def test_second_signal_inside_a_stage_checkpoint_write(uninterrupted, tmp_path):
    """A second signal inside stage 1's last checkpoint write stops it at once: its last
    whole checkpoint (epoch 1) stays and the temporary goes; stage 0 ends with one line
    after --timeout, and --resume says in one line that the stages' checkpoints differ."""
    out = tmp_path / "run"
    procs = launch([*FLAGS, "--timeout", "10", "--out", out],
                   wrap={1: ["tests/signal_at.py", "checkpoint-write:2", "SIGTERM"]})
    results = [p.communicate(timeout=120) for p in procs]
    assert procs[1].returncode == 130 and results[1][1].strip() == "interrupted", results
    assert procs[0].returncode == 2 and results[0][1].startswith("error: "), results
    assert len(results[0][1].strip().splitlines()) == 1, results
    assert not list(out.glob(".*.tmp"))
    steps = [torch.load(out / f"checkpoint-stage{r}.pt")["state"]["step"] for r in (0, 1)]
    assert steps == [128, 64]
    procs = launch(["--resume", out])
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], results
    lines = [line for _, err in results for line in err.strip().splitlines()]
    assert len(lines) == 1 and lines[0].startswith("error: the stage checkpoints"), results
    assert "different steps [128, 64]" in lines[0]


FOUR = [*FLAGS, "--stages", "1", "1", "1", "1"]


@pytest.fixture(scope="module")
def four_stages(tmp_path_factory, mnist_root):
    """A 4-stage run (one block a stage, two processes a core) to completion."""
    out = tmp_path_factory.mktemp("four") / "run"
    procs = launch([*FOUR, "--out", out], world=4)
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, results
    return out, json.loads((out / "summary.json").read_text())


def assert_same_end(out, reference_dir, reference, ranks):
    """The run in `out` ended exactly where the reference did: figures, metrics rows and
    every stage's parameters."""
    summary = json.loads((out / "summary.json").read_text())
    for key in ("test_acc", "test_loss", "train_loss", "sg_loss1"):
        assert summary[key] == reference[key], key
    assert rows_without_time(out) == rows_without_time(reference_dir)
    for rank in range(ranks):
        got = torch.load(out / f"checkpoint-stage{rank}.pt")["model"]
        want = torch.load(reference_dir / f"checkpoint-stage{rank}.pt")["model"]
        for name, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[name], value), (rank, name)


def test_four_stages_train_and_report_every_edge(four_stages):
    out, summary = four_stages
    assert sorted(p.name for p in out.glob("checkpoint-stage*.pt")) == [
        f"checkpoint-stage{r}.pt" for r in range(4)]
    assert summary["processes"] == 4 and summary["stages"] == [1, 1, 1, 1]
    assert summary["interfaces_after"] == [1, 2, 3]
    assert all(summary[f"sg_loss{i}"] >= 0 for i in (1, 2, 3))
    assert summary["test_acc"] > 0.7
    assert [t["rank"] for t in summary["stage_times"]] == [0, 1, 2, 3]


def test_sigterm_in_a_four_stage_run_stops_all_and_resume_is_exact(four_stages, tmp_path):
    """SIGTERM to a middle stage: the stop reaches stage 0 through the targets and the others
    through the activations; all four save and exit 143, and --resume ends exactly as the
    uninterrupted run."""
    reference_dir, reference = four_stages
    out = tmp_path / "run"
    procs = launch([*FOUR, "--out", out], world=4)
    wait_for_steps(out, rows=5)
    procs[2].send_signal(signal.SIGTERM)
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [143] * 4, results
    assert "continue with --resume" in results[3][1]
    assert all(err.strip() == "" for _, err in results[:3])
    done = torchrun(["--resume", out], world=4)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_end(out, reference_dir, reference, 4)


def test_sigkill_in_a_four_stage_run_ends_the_others_and_resume_is_exact(four_stages, tmp_path):
    """SIGKILL to stage 1 once every stage has saved epoch 1: the other three end within 60 s
    with one `error:` line each (no traceback, no hang); --resume restarts all four from
    their checkpoints and ends exactly as the uninterrupted run."""
    reference_dir, reference = four_stages
    out = tmp_path / "run"
    procs = launch([*FOUR, "--out", out], world=4)
    deadline = time.monotonic() + 120
    while len(list(out.glob("checkpoint-stage*.pt"))) < 4:
        assert time.monotonic() < deadline, "epoch 1 did not end"
        time.sleep(0.02)
    procs[1].kill()
    start = time.monotonic()
    results = {r: procs[r].communicate(timeout=60) for r in (0, 2, 3)}
    assert time.monotonic() - start < 60
    procs[1].communicate()
    assert summary_missing(out), "the run ended before the kill"
    for rank, (_, err) in results.items():
        assert procs[rank].returncode == 2, (rank, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: stage {rank}: "), (rank, err)
    done = torchrun(["--resume", out], world=4)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_end(out, reference_dir, reference, 4)


def test_two_nodes_through_the_c10d_rendezvous_train_a_four_stage_pipeline(four_stages,
                                                                           tmp_path):
    """Two torchrun invocations, --nnodes 2 with two processes each, meet through torchrun's
    own c10d rendezvous on loopback, as two machines would, and train the 4-stage pipeline to
    the end, exactly as one machine does."""
    _, reference = four_stages
    out = tmp_path / "run"
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
         "2", "--node_rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint",
         f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "main.py", *FOUR, "--out", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)]
    results = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], results
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 4
    for key in ("test_acc", "test_loss", "train_loss"):
        assert summary[key] == reference[key], key


def number(field: str) -> float:
    """A metrics.csv field as a number (empty: nan)."""
    return float(field) if field else math.nan


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
    assert procs[0].returncode == 2
    assert err.strip().splitlines() == [err.strip().splitlines()[-1]]
    assert err.startswith("error: stage 0: stage 1 is not answering"), err
    procs[1].communicate()


def test_silent_stage_times_out(tmp_path, mnist_root):
    """A stage that stops answering without dying (SIGSTOP) ends the other after --timeout."""
    out = tmp_path / "run"
    procs = launch([*FLAGS, "--epochs", "20", "--timeout", "10", "--out", out])
    wait_for_steps(out)
    procs[1].send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        assert time.monotonic() - start < 40
        assert procs[0].returncode == 2
        assert err.startswith("error: stage 0: stage 1 is not answering: no message for 10s"), err
    finally:
        procs[1].kill()
        procs[1].communicate()


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
