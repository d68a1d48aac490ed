"""The scripts end to end on tiny subsets: summaries, determinism, and one-line errors for
every bad input they handle."""

import json
import shutil

import pytest
import torch

TINY = ["--epochs", "1", "--train-size", "512", "--batch-size", "64", "--device", "cpu"]


def assert_one_error_line(result):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def corrupt_data_dir(tmp_path_factory, mnist_root):
    root = tmp_path_factory.mktemp("corrupt")
    shutil.copytree(mnist_root / "MNIST", root / "MNIST")
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[123456] ^= 1
    path.write_bytes(bytes(data))
    return root


BAD_INPUTS = {
    "epochs zero": ["--epochs", "0"],
    "epochs negative": ["--epochs", "-2"],
    "epochs not a number": ["--epochs", "many"],
    "batch size zero": ["--batch-size", "0"],
    "lr zero": ["--lr", "0"],
    "lr negative": ["--lr", "-0.1"],
    "lr not finite": ["--lr", "nan"],
    "train size zero": ["--train-size", "0"],
    "train size beyond the data": ["--train-size", "60001"],
    "unknown device": ["--device", "tpu"],
    "unknown flag": ["--bogus"],
}


@pytest.mark.parametrize("script", ["mlp.py", "main.py"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_flags_give_one_error_line(run_script, script, case):
    assert_one_error_line(run_script(script, *BAD_INPUTS[case]))


def test_out_that_cannot_be_written(run_script, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_script("cnn.py", *TINY, "--out", blocker / "run")
    assert_one_error_line(result)
    assert "--out" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(run_script):
    result = run_script("mlp.py", "--device", "cuda")
    assert_one_error_line(result)
    assert "cuda" in result.stderr.lower()


def test_corrupt_data_file_is_named(run_script, corrupt_data_dir, tmp_path):
    result = run_script("mlp.py", *TINY, "--data-dir", corrupt_data_dir, "--out", tmp_path)
    assert_one_error_line(result)
    assert "train-images-idx3-ubyte" in result.stderr


@pytest.mark.parametrize("argv", [
    ["main.py", "--model_type", "rnn"],
    ["main.py", "--conditioned", "maybe"],
    ["main.py", "--model_type", "mlp", "--synthesizer", "conv"],
    ["main.py", "--synth-lr", "0"],
    ["main.py", "--log-every", "-1"],
    ["main.py", "--interfaces-at", "0"],
    ["main.py", "--interfaces-at", "4"],           # the MLP's head is block 4
    ["main.py", "--interfaces-at", "2", "1"],
    ["main.py", "--interfaces-at", "1", "1"],
    ["main.py", "--interfaces", "edges"],          # one process: --interfaces-at instead
    ["main.py", "--interfaces", "some"],
    ["main.py", "--interfaces", "all", "--interfaces-at", "1"],
    ["main.py", "--message-dtype", "float16"],
])
def test_bad_dni_flags(run_script, argv):
    assert_one_error_line(run_script(*argv))


def test_help_shows_every_default(run_script):
    out = run_script("main.py", "--help").stdout
    for flag in ("--epochs", "--batch-size", "--lr", "--seed", "--synth-lr", "--log-every"):
        assert flag in out
    assert "(default: 20)" in out and "1e-2 for DNI" in out


SUMMARY_KEYS = {"script", "model", "method", "epochs", "test_acc", "test_loss", "train_seconds",
                "samples_per_s", "device", "seed", "argv"}


def read_summary(out):
    return json.loads((out / "summary.json").read_text())


def test_mlp_baseline_runs_and_repeats_exactly(run_script, tmp_path):
    summaries = []
    for name in ("a", "b"):
        result = run_script("mlp.py", *TINY, "--out", tmp_path / name)
        assert result.returncode == 0, result.stderr
        assert "epoch   1/1" in result.stdout and "test_acc" in result.stdout
        summaries.append(read_summary(tmp_path / name))
    a, b = summaries
    assert SUMMARY_KEYS <= set(a)
    assert a["script"] == "mlp.py" and a["method"] == "backprop" and a["model"] == "mlp"
    assert 0.5 < a["test_acc"] <= 1 and a["samples_per_s"] > 0 and a["device"] == "cpu"
    assert (a["test_acc"], a["test_loss"], a["train_loss"]) == \
        (b["test_acc"], b["test_loss"], b["train_loss"])


def test_cnn_baseline_runs(run_script, tmp_path):
    result = run_script("cnn.py", *TINY, "--epochs", "2", "--lr", "3e-3", "--channels", "4", "8",
                        "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    summary = read_summary(tmp_path)
    assert summary["model"] == "cnn" and summary["test_acc"] > 0.3


@pytest.mark.parametrize("argv, method, interfaces", [
    (["--model_type", "mlp"], "dni", 3),
    (["--model_type", "mlp", "--conditioned", "True", "--synthesizer", "mlp",
      "--synth-hidden", "32"], "cdni", 3),
    (["--model_type", "mlp", "--conditioned", "--forward-unlock"], "cdni", 3),
    (["--model_type", "cnn", "--conditioned", "false", "--channels", "4", "8",
      "--synth-hidden", "4"], "dni", 2),
])
def test_main_runs_dni_and_cdni(run_script, tmp_path, argv, method, interfaces):
    result = run_script("main.py", *TINY, *argv, "--log-every", "4", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    summary = read_summary(tmp_path)
    assert SUMMARY_KEYS <= set(summary) and summary["method"] == method
    for i in range(1, interfaces + 1):
        assert summary[f"sg_loss{i}"] >= 0 and -1 <= summary[f"cos{i}"] <= 1
        assert f"cos{i}" in result.stdout
    assert f"cos{interfaces + 1}" not in summary


def test_interfaces_at_puts_interfaces_only_after_those_blocks(run_script, tmp_path):
    """--interfaces-at 2: one interface, after the second hidden block; the blocks below it
    learn from it, the blocks above it by backprop."""
    result = run_script("main.py", *TINY, "--interfaces-at", "2", "--log-every", "4",
                        "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    summary = read_summary(tmp_path)
    assert summary["interfaces"] == ["1"]
    assert summary["sg_loss1"] >= 0 and -1 <= summary["cos1"] <= 1 and "cos2" not in summary
    state = torch.load(tmp_path / "checkpoint.pt")["model"]
    assert sorted({k.split(".")[1] for k in state if k.startswith("interfaces.")}) == ["0"]


@pytest.mark.parametrize("argv, batch_size, synth_lr, synth_layers", [
    (["--model_type", "mlp"], 256, 1e-2, None),
    (["--model_type", "mlp", "--conditioned"], 256, 1e-3, None),
    (["--model_type", "cnn", "--channels", "4", "8"], 64, 1e-3, 1),
    (["--model_type", "cnn", "--channels", "4", "8", "--conditioned"], 64, 1e-4, 1),
])
def test_main_defaults_depend_on_the_model(run_script, tmp_path, argv, batch_size, synth_lr,
                                           synth_layers):
    result = run_script("main.py", "--epochs", "1", "--train-size", "300", "--device", "cpu",
                        "--log-every", "0", *argv, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    args = json.loads((tmp_path / "config.json").read_text())["args"]
    assert (args["batch_size"], args["synth_lr"], args["synth_layers"]) == \
        (batch_size, synth_lr, synth_layers)
