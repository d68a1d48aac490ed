"""rnn_tasks.py runs side by side in one process (experiment/rnn_group.py): each run trains
as it trains alone (curriculum, weights), with sequences of different lengths in one batch;
SIGTERM then resume is exact; a run of a group resumes alone from its checkpoint; mixed
settings are refused; bench/rnn.py --stack fills the same table; a run that diverges side by
side is recorded and the others resume."""

import json
import os
import re
import signal

import pytest
import torch

from experiment.errors import RunInterrupted, UserError
from experiment.rnn_group import clip_each_run, train_group
from experiment.rnn_train import parse_args, train
from tests.conftest import ROOT, assert_same_run, run_python, run_records

BENCH = ROOT / "bench" / "rnn.py"
SEEDS = (0, 1, 2)
# levels grow within a few steps, at different times for different seeds
GROWING = ["--steps", "16", "--batch-size", "4", "--hidden", "8", "--device", "cpu",
           "--log-every", "4", "--threads", "1", "--bits", "2", "--threshold", "6",
           "--window", "2", "--checkpoint-every", "5"]


def run_args(folder, seed, *extra):
    return parse_args([*GROWING, *extra, "--seed", str(seed), "--out", str(folder)])


def weights(folder):
    return torch.load(folder / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize("extra", [
    ["--method", "dni_aux", "--truncation", "2", "--target-decay", "0.5"],
    ["--method", "bptt", "--truncation", "0", "--task", "repeat_copy"],
    ["--method", "dni", "--truncation", "3", "--synthesizer", "mlp", "--clip", "0.5",
     "--synth-input-window", "5"],
    ["--method", "dni", "--truncation", "7", "--task", "mnist_rows"],
])
def test_runs_side_by_side_train_as_they_train_alone(tmp_path, extra):
    alone = [train(run_args(tmp_path / f"alone{s}", s, *extra)) for s in SEEDS]
    group = train_group([run_args(tmp_path / f"group{s}", s, *extra) for s in SEEDS])
    if "mnist_rows" not in extra:      # one length there
        assert len({json.dumps(a["levels"]) for a in alone}) > 1, "the lengths must differ"
    for s, want, got in zip(SEEDS, alone, group):
        for key in ("levels", "max_length_solved", "final_length", "steps"):
            assert got[key] == want[key], (s, key)
        assert got["stacked_runs"] == len(SEEDS)
        if "test_accuracy" in want:
            assert got["test_accuracy"] == pytest.approx(want["test_accuracy"], abs=2e-3)
        single, stacked = weights(tmp_path / f"alone{s}"), weights(tmp_path / f"group{s}")
        assert single.keys() == stacked.keys()
        for name, value in single.items():
            assert torch.allclose(stacked[name], value, atol=1e-4), (s, name)
        rows = run_records(tmp_path / f"group{s}")[0]
        assert [int(r["step"]) for r in rows] == [4, 8, 12, 16]


def test_sigterm_then_resume_is_exact_and_a_run_resumes_alone(tmp_path):
    extra = ["--method", "dni", "--truncation", "2"]
    train_group([run_args(tmp_path / f"ref{s}", s, *extra) for s in SEEDS])

    def kill(step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(RunInterrupted, match="after step 7;"):
        train_group([run_args(tmp_path / f"cut{s}", s, *extra) for s in SEEDS], on_step=kill)
    assert not (tmp_path / "cut0" / "summary.json").exists()
    train_group([parse_args(["--resume", str(tmp_path / f"cut{s}")]) for s in SEEDS])
    for s in SEEDS:
        assert_same_run(tmp_path / f"cut{s}", tmp_path / f"ref{s}",
                        ("max_length_solved", "final_length", "levels", "steps"))
    # a group's checkpoint is rnn_tasks.py's: a run goes on alone
    summary = train(parse_args(["--resume", str(tmp_path / "cut2"), "--steps", "20"]))
    assert summary["steps"] == 20 and "stacked_runs" not in summary


def test_runs_resumed_side_by_side_keep_their_own_clocks(tmp_path):
    extra = ["--method", "dni", "--truncation", "2", "--steps", "5"]
    for s in (0, 1):
        train(run_args(tmp_path / f"run{s}", s, *extra))
    checkpoints = [torch.load(tmp_path / f"run{s}" / "checkpoint.pt", weights_only=False)
                   for s in (0, 1)]
    before = [checkpoint["state"]["train_seconds"] for checkpoint in checkpoints]
    path, checkpoint = tmp_path / "run1" / "checkpoint.pt", checkpoints[1]
    checkpoint["state"]["train_seconds"] += 1000.0       # run 1 had trained longer alone
    checkpoint["state"]["wall_seconds"] += 1000.0
    torch.save(checkpoint, path)
    group = train_group([parse_args(["--resume", str(tmp_path / f"run{s}"), "--steps", "8"])
                         for s in (0, 1)])
    assert [g["steps"] for g in group] == [8, 8]
    assert group[0]["train_seconds"] > before[0]
    assert group[1]["train_seconds"] - group[0]["train_seconds"] == pytest.approx(
        before[1] + 1000.0 - before[0])
    for s, summary in zip((0, 1), group):          # each checkpoint holds its own clocks
        state = torch.load(tmp_path / f"run{s}" / "checkpoint.pt", weights_only=False)["state"]
        assert state["train_seconds"] == summary["train_seconds"]
        assert state["wall_seconds"] < 900 if s == 0 else state["wall_seconds"] > 1000


def test_mixed_settings_and_steps_are_refused(tmp_path):
    with pytest.raises(UserError, match="--truncation differs"):
        train_group([run_args(tmp_path / "a", 0, "--truncation", "2"),
                     run_args(tmp_path / "b", 1, "--truncation", "3")])
    with pytest.raises(UserError, match="LSTM core"):
        train_group([run_args(tmp_path / "c", s, "--core", "gru") for s in (0, 1)])
    train(run_args(tmp_path / "d", 0, "--steps", "3"))
    train(run_args(tmp_path / "e", 1, "--steps", "5"))
    config = (tmp_path / "d" / "config.json").read_text()
    with pytest.raises(UserError, match=r"at steps \[3, 5\]"):
        train_group([parse_args(["--resume", str(tmp_path / x), "--steps", "9"]) for x in "de"])
    assert (tmp_path / "d" / "config.json").read_text() == config   # a refusal writes nothing


def test_clip_each_run_clips_every_run_by_its_own_norm():
    grads = [torch.tensor([[3.0, 4.0], [0.3, 0.4]]), torch.tensor([[0.0], [0.0]])]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    clip_each_run(params, 1.0, runs=2)
    assert torch.allclose(params[0].grad[0], torch.tensor([0.6, 0.8]), atol=1e-5)  # norm 5 -> 1
    assert torch.equal(params[0].grad[1], grads[0][1])                              # 0.5: kept


def test_bench_stack_fills_the_table(tmp_path):
    result = run_python(BENCH, "--tasks", "copy", "--truncations", "0", "2", "--methods", "bptt",
                        "dni", "--seeds", "0", "1", "--stack", "--results", tmp_path, "--steps",
                        "6", "--batch-size", "2", "--hidden", "4")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "copy-bptt-T0-s0", "copy-bptt-T0-s1", "copy-bptt-T2-s0", "copy-bptt-T2-s1",
        "copy-dni-T2-s0", "copy-dni-T2-s1"]
    summary = json.loads((tmp_path / "copy-dni-T2-s1" / "summary.json").read_text())
    assert summary["stacked_runs"] == 2 and summary["seed"] == 1
    assert "| copy | 2 | 0 (0-0) | 0 (0-0) | 2 |" in result.stdout
    # a line a run as it ends, as alone, with the group's size
    assert re.search(r"^copy-dni-T2-s1: length 0 \((stalled|still growing)\) at 6 steps, "
                     r"\d+s, 2 side by side$", result.stdout, re.MULTILINE)


def test_bench_stack_goes_on_with_growing_runs_side_by_side_until_they_stall(tmp_path):
    result = run_python(BENCH, "--tasks", "copy", "--truncations", "0", "--seeds", "0", "1",
                        "--stack", "--results", tmp_path, "--steps", "4", "--until-stalled", "40",
                        "--batch-size", "2", "--hidden", "4", "--bits", "2", "--threshold", "6",
                        "--window", "2", "--max-length", "5", timeout=120)
    assert result.returncode == 0, result.stderr
    for seed in (0, 1):
        summary = json.loads((tmp_path / f"copy-bptt-T0-s{seed}" / "summary.json").read_text())
        assert summary["stalled"] and summary["steps"] > 4 and summary["stacked_runs"] == 2
    for seed in (0, 1):                  # first 4 steps, then extended to 6, side by side
        for steps in (4, 6):
            assert re.search(rf"^copy-bptt-T0-s{seed}: length \d+ \(.*\) at {steps} steps, "
                             r"\d+s, 2 side by side$", result.stdout, re.MULTILINE), (seed, steps)


def test_bench_stack_cost_times_both_ways():
    result = run_python(BENCH, "--tasks", "repeat_copy", "--truncations", "2", "--methods",
                        "dni_aux", "--seeds", "0", "1", "--stack-cost", "1", "--batch-size", "2",
                        "--hidden", "4")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| repeat_copy |")]
    assert [row.split(" | ")[3] for row in rows] == ["2", "10", "30"]
    for row in rows:
        alone, stacked, gain = row.strip(" |").split(" | ")[4:]
        assert float(alone) > 0 and float(stacked) > 0
        # runs a second: two runs alone against one side-by-side step (times shown rounded)
        assert float(gain[:-1]) == pytest.approx(2 * float(alone) / float(stacked), rel=0.2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_side_by_side_on_a_gpu_train_as_on_the_cpu(tmp_path):
    """The GPU path of the recurrent table: the same group on CUDA and on the CPU."""
    extra = ["--method", "dni_aux", "--truncation", "2"]
    on_cpu = train_group([run_args(tmp_path / f"cpu{s}", s, *extra) for s in (0, 1)])
    on_gpu = train_group([run_args(tmp_path / f"gpu{s}", s, *extra, "--device", "cuda")
                          for s in (0, 1)], "cuda")
    for s, want, got in zip((0, 1), on_cpu, on_gpu):
        assert got["levels"] == want["levels"] and got["device"].startswith("cuda")
        gpu, cpu = weights(tmp_path / f"gpu{s}"), weights(tmp_path / f"cpu{s}")
        for name, value in cpu.items():
            assert torch.allclose(gpu[name].cpu(), value, atol=1e-3), name


def test_a_group_of_one_run_is_the_run_alone(tmp_path):
    extra = ["--method", "dni_aux", "--truncation", "2"]
    alone = train(run_args(tmp_path / "alone", 0, *extra))
    [group] = train_group([run_args(tmp_path / "group", 0, *extra)])
    assert group["levels"] == alone["levels"] and group["stacked_runs"] == 1


@pytest.mark.parametrize("flags", [["--core", "gru"], ["--synthesizer", "rnn"]])
def test_bench_stack_cost_refuses_what_cannot_stack_in_one_line(flags):
    result = run_python(BENCH, "--tasks", "copy", "--truncations", "2", "--methods", "dni",
                        "--seeds", "0", "1", "--stack-cost", "1", "--hidden", "4", *flags)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), \
        result.stderr


@pytest.mark.parametrize("poison", ["weights", "gradient"])
def test_a_run_that_diverges_side_by_side_is_recorded_and_the_others_go_on(tmp_path,
                                                                           monkeypatch, poison):
    from bench.rnn import run_name, train_stacked
    from experiment import rnn_group

    extra = [*GROWING, "--checkpoint-every", "5"]
    cell = ("copy", "dni", 2)
    reference = train_group([run_args(tmp_path / f"ref{s}", s, "--method", "dni",
                                      "--truncation", "2") for s in SEEDS])
    after_step = rnn_group._GroupLoop.after_step

    def poison_seed_1_once(loop):                 # after step 7: the checkpoint is at step 5
        after_step(loop)
        if loop.state.step == 7 and len(loop.members) == 3:
            first = next(loop.model.parameters())
            if poison == "weights":               # its loss goes NaN
                with torch.no_grad():
                    first[1].fill_(float("nan"))
            else:                                 # its loss stays finite, a gradient does not
                first.register_hook(lambda g: g.index_fill(0, torch.tensor([1]), float("inf")))

    starts = []
    group = rnn_group.train_group

    def recorded(runs, *args):
        starts.append([(run.seed, run.resume is not None) for run in runs])
        return group(runs, *args)

    monkeypatch.setattr(rnn_group._GroupLoop, "after_step", poison_seed_1_once)
    monkeypatch.setattr(rnn_group, "train_group", recorded)
    folders = [tmp_path / run_name(*cell[:2], cell[2], s) for s in SEEDS]
    records = train_stacked(folders, cell, list(SEEDS), extra, 16)
    assert records[1]["diverged"] and "at step 7" in records[1]["error"]
    assert ("non-finite loss" in records[1]["error"]) == (poison == "weights")
    assert (folders[1] / "diverged.json").exists() and not (folders[1] / "summary.json").exists()
    assert starts == [[(0, False), (1, False), (2, False)], [(0, True), (2, True)]]
    for s in (0, 2):                                # resumed from step 5 as a group of two
        assert records[s]["stacked_runs"] == 2
        for key in ("levels", "max_length_solved", "steps"):
            assert records[s][key] == reference[s][key], (s, key)
        for name, value in weights(tmp_path / f"ref{s}").items():
            assert torch.allclose(weights(folders[s])[name], value, atol=1e-5), (s, name)


def test_bench_stack_reads_a_relative_data_dir_from_the_repository_as_runs_alone_do(
        mnist_root, tmp_path, monkeypatch):
    from bench.rnn import run_name, train_stacked

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    folders = [tmp_path / run_name("mnist_rows", "bptt", 7, s) for s in (0, 1)]
    records = train_stacked(folders, ("mnist_rows", "bptt", 7), [0, 1],
                            [*GROWING, "--data-dir", "data"], 16)
    assert all(r["steps"] == 16 and "test_accuracy" in r for r in records)
    saved = json.loads((folders[0] / "config.json").read_text())["args"]["data_dir"]
    assert saved == str(mnist_root) and list(elsewhere.iterdir()) == []
