"""rnn_tasks.py and its loop (experiment/rnn_train.py): summary, one-line errors for bad flags,
divergence, and exact resume after SIGTERM."""

import csv
import json
import os
import signal

import pytest
import torch

from experiment.errors import RunInterrupted, UserError
from experiment.rnn_train import parse_args, train
from tests.conftest import assert_same_run, run_records

TINY = ["--steps", "12", "--batch-size", "4", "--hidden", "8", "--device", "cpu",
        "--log-every", "4", "--threads", "1"]


def assert_one_error_line(result):
    assert result.returncode not in (0, None)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr


def test_script_writes_summary(run_script, tmp_path):
    result = run_script("rnn_tasks.py", *TINY, "--task", "copy", "--method", "dni",
                        "--truncation", "2", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("task", "method", "truncation", "max_length_solved", "steps", "train_seconds"):
        assert key in summary
    assert (summary["task"], summary["method"], summary["truncation"]) == ("copy", "dni", 2)
    assert summary["steps"] == 12 and summary["train_seconds"] > 0
    assert "length" in result.stdout and "solved" in result.stdout
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [4, 8, 12]
    assert rows[0]["sg_loss"] != "" and rows[0]["aux_loss"] == ""
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "config.json").exists()


@pytest.mark.parametrize("task, method, core", [("repeat_copy", "dni_aux", "lstm"),
                                                ("add", "bptt", "gru"), ("argmax", "dni", "rnn")])
def test_every_task_and_method_trains(tmp_path, task, method, core):
    summary = train(parse_args([*TINY, "--task", task, "--method", method, "--core", core,
                                "--max-length", "16", "--out", str(tmp_path)]))
    assert (summary["task"], summary["method"], summary["core"]) == (task, method, core)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert (rows[-1]["aux_loss"] != "") == (method == "dni_aux")
    assert (rows[-1]["sg_loss"] != "") == (method != "bptt")


BAD = {
    "truncation zero (untruncated) with DNI": ["--truncation", "0"],
    "truncation zero (untruncated) with DNI+Aux": ["--truncation", "0", "--method", "dni_aux"],
    "truncation negative": ["--truncation", "-1", "--method", "bptt"],
    "steps negative": ["--steps", "-3"],
    "unknown task": ["--task", "sort"],
    "unknown method": ["--method", "sgd"],
    "lr zero": ["--lr", "0"],
    "discount negative": ["--discount", "-1"],
    "discount not a number": ["--discount", "big"],
    "discount infinite (by its old name)": ["--grad-scale", "inf"],
    "batch size zero": ["--batch-size", "0"],
    "hidden not a number": ["--hidden", "x"],
    "unknown synthesizer": ["--synthesizer", "conv"],
    "log every negative": ["--log-every", "-1"],
    "threads negative": ["--threads", "-2"],
    "unknown device": ["--device", "tpu"],
    "unknown flag": ["--bogus"],
    "target decay one": ["--target-decay", "1"],
    "target decay negative": ["--target-decay", "-0.5"],
    "inputs to no synthesizer": ["--method", "bptt", "--synth-input-window", "4"],
    "input window negative": ["--method", "dni", "--synth-input-window", "-1"],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_flags_give_one_error_line(case):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(BAD[case])
    assert exit_info.value.code == 2


def test_zero_discount_and_aux_weight_are_allowed():
    args = parse_args(["--discount", "0.0", "--aux-weight", "0"])
    assert args.discount == 0.0 and args.aux_weight == 0.0
    assert parse_args(["--grad-scale", "0.25"]).discount == 0.25   # the old name


def test_resume_of_a_run_saved_with_grad_scale_keeps_its_discount(tmp_path):
    config = {"script": "rnn_tasks.py", "args": {"task": "copy", "grad_scale": 0.3}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert parse_args(["--resume", str(tmp_path)]).discount == 0.3


def test_bad_flag_through_the_script(run_script):
    result = run_script("rnn_tasks.py", "--truncation", "0")
    assert_one_error_line(result)
    assert result.returncode == 2 and "--truncation" in result.stderr


def test_resume_of_a_missing_run(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        train(parse_args(["--resume", str(tmp_path / "none")]))
    with pytest.raises(UserError, match="no config.json"):
        train(parse_args(["--resume", str(tmp_path)]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(tmp_path):
    with pytest.raises(UserError, match="cuda"):
        train(parse_args(["--device", "cuda", "--out", str(tmp_path)]))


def tiny_args(out, *extra):
    return parse_args([*TINY, "--steps", "9", "--log-every", "2", "--checkpoint-every", "4",
                       "--out", str(out), *extra])


@pytest.mark.parametrize("stop_after, extra", [
    (3, ["--method", "dni", "--truncation", "2", "--target-decay", "0"]),
    (4, ["--method", "dni_aux", "--truncation", "3", "--synthesizer", "rnn"]),
    (8, ["--method", "bptt", "--task", "repeat_copy", "--core", "gru"]),
])
def test_sigterm_then_resume_is_exact(tmp_path, stop_after, extra):
    extra = [*extra, "--bits", "2", "--threshold", "6", "--window", "2"]  # levels grow
    train(tiny_args(tmp_path / "ref", *extra))
    assert run_records(tmp_path / "ref")[1]["final_length"] > 1

    def kill(step):
        if step == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(RunInterrupted) as info:
        train(tiny_args(tmp_path / "cut", *extra), on_step=kill)
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert f"after step {stop_after};" in str(info.value) and "epoch" not in str(info.value)
    assert not (tmp_path / "cut" / "summary.json").exists()
    train(parse_args(["--resume", str(tmp_path / "cut")]))
    assert_same_run(tmp_path / "cut", tmp_path / "ref",
                    ("max_length_solved", "final_length", "levels", "steps"))


def test_divergence_stops_with_one_line(tmp_path, monkeypatch):
    from experiment import sequence_tasks

    sample = sequence_tasks.Copy.sample
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        batch = sample(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 6:
            batch.inputs[0] = float("nan")
        return batch

    monkeypatch.setattr(sequence_tasks.Copy, "sample", poisoned)
    with pytest.raises(UserError, match="diverged: non-finite loss at step 5; the last good"):
        train(tiny_args(tmp_path))
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "summary.json").exists()


def test_resume_of_a_run_older_than_the_target_synthesizer(tmp_path):
    """A saved run without target_decay ran without the target synthesizer; today's default
    (0.9) must not switch it on when it resumes, while a flag given now still wins."""
    config = {"script": "rnn_tasks.py",
              "args": {"task": "copy", "method": "dni", "truncation": 2, "synth_lr": None}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = parse_args(["--resume", str(tmp_path)])
    assert args.target_decay == 0.0 and args.truncation == 2 and args.synth_lr is None
    assert parse_args(["--resume", str(tmp_path), "--target-decay", "0.5"]).target_decay == 0.5
    assert parse_args([]).target_decay == 0.9 and parse_args([]).synth_lr == 1e-3


def test_mnist_rows_scores_the_test_set(tmp_path):
    """The summary's test accuracy is the model's on the whole test set: with the readout
    forced to one class it is that class's share of the test labels."""
    from experiment.rnn_train import build_model, task_of, test_accuracy

    summary = train(tiny_args(tmp_path, "--task", "mnist_rows", "--method", "dni",
                              "--truncation", "7"))
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["max_length_solved"] <= 1
    args = tiny_args(tmp_path / "b", "--task", "mnist_rows")
    task = task_of(args)
    model = build_model(args, task.input_size, task.output_size)
    with torch.no_grad():
        model.trainer.readout.weight.zero_()
        model.trainer.readout.bias.copy_(torch.nn.functional.one_hot(torch.tensor(3), 10))
    [accuracy] = test_accuracy(task, model, torch.device("cpu"))
    assert accuracy == pytest.approx((task.test_y == 3).float().mean().item())


def test_sequential_mnist_has_its_own_synthesizer_defaults():
    copy, mnist = parse_args(["--task", "copy"]), parse_args(["--task", "mnist_rows"])
    assert (copy.synth_lr, copy.target_decay) == (1e-3, 0.9)
    assert (mnist.synth_lr, mnist.target_decay) == (1e-4, 0.0)
    given = parse_args(["--task", "mnist_rows", "--synth-lr", "1e-2", "--target-decay", "0.5"])
    assert (given.synth_lr, given.target_decay) == (1e-2, 0.5)


def test_synthesizer_input_window_is_built_and_kept_on_resume(tmp_path):
    """--synth-input-window K gives S the last K inputs (K * I wide); a run saved before the
    flag resumes without a window, and a resume may not change it."""
    from experiment.rnn_train import build_model

    args = parse_args(["--method", "dni", "--truncation", "3", "--synth-input-window", "5"])
    model = build_model(args, 10, 9)
    assert model.trainer.input_window == 5
    assert model.trainer.synthesizer.net[0].in_features == 2 * 128 + 5 * 10
    assert build_model(parse_args(["--truncation", "3"]), 10, 9).trainer.input_window == 0
    train(tiny_args(tmp_path, "--method", "dni", "--truncation", "2", "--synth-input-window", "3"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["args"]["synth_input_window"] == 3
    assert parse_args(["--resume", str(tmp_path)]).synth_input_window == 3
    with pytest.raises(SystemExit):
        parse_args(["--resume", str(tmp_path), "--synth-input-window", "4"])
    del config["args"]["synth_input_window"]          # a run saved before the flag existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert parse_args(["--resume", str(tmp_path)]).synth_input_window == 0
    with pytest.raises(SystemExit):                   # it ran without a window: kept so
        parse_args(["--resume", str(tmp_path), "--synth-input-window", "3"])
