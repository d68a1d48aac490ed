"""The scripts end to end on tiny subsets: summaries, determinism, defaults and help (their
bad inputs are in test_bad_input.py)."""

import json

import pytest
import torch

TINY = ["--epochs", "1", "--train-size", "512", "--batch-size", "64", "--device", "cpu"]


def help_entries(text):
    """{flag: its help text} from argparse's --help output."""
    entries, flag = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif flag and line.startswith("      "):
            entries[flag] += " " + line.strip()
    return entries


@pytest.mark.parametrize("script", ["main.py", "mlp.py", "cnn.py", "rnn_tasks.py",
                                    "misc/plot.py", "bench/parallel.py", "bench/paper_budget.py",
                                    "bench/graph_check.py"])
def test_help_shows_every_default(run_script, script):
    """Every flag's help says its default (argparse's, or what the script makes of None)."""
    result = run_script(script, "--help")
    assert result.returncode == 0, result.stderr
    entries = help_entries(result.stdout)
    assert len(entries) > 1
    missing = [flag for flag, text in entries.items()
               if flag != "-h" and "default" not in " ".join(text.split())]
    assert not missing, missing
    if script == "main.py":
        assert "(default: 50)" in entries["--log-every"]
        assert "1e-2 for DNI" in " ".join(entries["--synth-lr"].split())
        assert "cnn 10 as cnn.py" in " ".join(entries["--epochs"].split())


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


def test_head_only_baseline_trains_only_the_classifier_head(run_script, tmp_path):
    """No Bprop (--head-only): the hidden blocks' weights are those they started with (the
    same seed's initial network), the head's have moved; the summary says no_bprop."""
    from model import FCN

    result = run_script("mlp.py", *TINY, "--head-only", "--depth", "2", "--width", "32",
                        "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_summary(tmp_path)["method"] == "no_bprop"
    trained = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    torch.manual_seed(0)
    initial = FCN(depth=2, width=32).state_dict()
    hidden = [k for k in initial if not k.startswith("2.") and "running" not in k
              and "num_batches" not in k]
    assert hidden and all(torch.equal(trained[k], initial[k]) for k in hidden)
    assert not torch.equal(trained["2.weight"], initial["2.weight"])


def test_schedules_constant_cosine_and_the_papers_steps():
    from experiment.train import learning_rate_schedule

    rates = {}
    for kind in ("constant", "cosine", "step"):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        schedule = learning_rate_schedule(opt, 10, kind)
        rates[kind] = []
        for _ in range(10):
            rates[kind].append(opt.param_groups[0]["lr"])
            opt.step()
            schedule.step()
    assert rates["constant"] == [0.1] * 10
    assert rates["cosine"][5] == pytest.approx(0.05)
    # the paper's 500k-update run: a tenth from update 300k, a hundredth from 400k
    assert rates["step"] == pytest.approx([0.1] * 6 + [0.01] * 2 + [0.001] * 2)


def test_table1_cells_run_the_scripts_the_table_names():
    from bench.table1 import cnn_channels, command

    assert command("fcn", 5, "no_bprop", 20) == ["mlp.py", "--head-only", "--depth", "4",
                                                 "--epochs", "20"]
    assert command("cnn", 4, "cdni", 2) == ["main.py", "--model_type", "cnn", "--conditioned",
                                            "True", "--channels", "32", "64", "64",
                                            "--epochs", "2"]
    assert cnn_channels(3) == ["32", "64"]


@pytest.mark.parametrize("argv, method, interfaces, label_inputs, unlocked", [
    (["--model_type", "mlp"], "dni", 3, 0, False),
    (["--model_type", "mlp", "--conditioned", "True", "--synthesizer", "mlp",
      "--synth-hidden", "32"], "cdni", 3, 10, False),
    (["--model_type", "mlp", "--conditioned", "--forward-unlock"], "cdni", 3, 10, True),
    (["--model_type", "cnn", "--conditioned", "false", "--channels", "4", "8",
      "--synth-hidden", "4"], "dni", 2, 0, False),
])
def test_main_runs_dni_and_cdni(run_script, tmp_path, argv, method, interfaces, label_inputs,
                                unlocked):
    """Each configuration builds what it names (an interface per hidden block, the label as
    a synthesizer input only under cDNI, input synthesizers only with forward unlocking),
    every synthesizer learns away from its zero start, the net learns, and the epoch line
    reports every interface."""
    result = run_script("main.py", *TINY, *argv, "--log-every", "4", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    summary = read_summary(tmp_path)
    assert SUMMARY_KEYS <= set(summary) and summary["method"] == method
    assert summary["test_acc"] > 0.12                 # above chance (0.1) after 8 steps
    for i in range(1, interfaces + 1):
        assert summary[f"sg_loss{i}"] > 0 and -1 <= summary[f"cos{i}"] <= 1
        assert f"cos{i}" in result.stdout.splitlines()[-2]
    assert f"cos{interfaces + 1}" not in summary
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    synthesizers = sorted({k.split(".")[1] for k in state if k.startswith("interfaces.")})
    assert synthesizers == [str(i) for i in range(interfaces)]
    for i in synthesizers:
        weights = [k for k in state if k.startswith(f"interfaces.{i}.synthesizer.")
                   and k.endswith("weight") and state[k].dim() > 1]
        assert state[weights[-1]].abs().sum() > 0, "the zero-initialised output layer moved"
        if argv[1] == "mlp":                          # a vector synthesizer on 256 units
            assert state[weights[0]].shape[1] == 256 + label_inputs
        assert any(f"interfaces.{i}.input_synthesizer." in k for k in state) == unlocked
    if argv[1] == "cnn":
        assert not any("context" in k for k in state)


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
