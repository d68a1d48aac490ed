"""The copy-task bench (bench/rnn.py) and what it rests on: untruncated BPTT (`--truncation 0`)
is full BPTT, the stalled check on a run's curriculum, and the table over seeds."""

import json
import subprocess

import pytest
import torch

from bench.rnn import INPUT_WINDOW, cell, run_name, table
from experiment.rnn_train import build_model, curriculum_stalled, parse_args
from experiment.sequence_tasks import make_task
from tests.conftest import ROOT, run_python


def run_bench(*flags, cwd=ROOT, check=True, timeout=300) -> subprocess.CompletedProcess:
    """bench/rnn.py with `flags` in a subprocess started in `cwd`."""
    return run_python(ROOT / "bench" / "rnn.py", *flags, cwd=cwd, check=check, timeout=timeout)


def gradients_after_trainer(truncation: str, task, batch) -> dict[str, torch.Tensor]:
    """The parameter gradients rnn_tasks.py's BPTT model leaves for one batch."""
    args = parse_args(["--task", "copy", "--method", "bptt", "--truncation", truncation,
                       "--hidden", "8", "--batch-size", "3", "--bits", "4"])
    torch.manual_seed(0)
    model = build_model(args, task.input_size, task.output_size)
    model.trainer(batch.inputs, task.loss_of(batch))
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_untruncated_bptt_gradient_is_full_bptt_by_autograd():
    task = make_task("copy", bits=4)
    batch = task.sample(6, 3, torch.Generator().manual_seed(1), torch.device("cpu"))  # 13 steps
    untruncated = gradients_after_trainer("0", task, batch)
    torch.manual_seed(0)
    model = build_model(parse_args(["--task", "copy", "--method", "bptt", "--hidden", "8",
                                    "--bits", "4"]), task.input_size, task.output_size)
    trainer = model.trainer
    outputs, _ = trainer.core(batch.inputs)            # the whole sequence in one graph
    loss = task.chunk_loss(trainer.readout(outputs), batch, 0, batch.inputs.shape[0])
    names = [name for name, _ in model.named_parameters()]
    full = dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))
    for name in names:
        torch.testing.assert_close(untruncated[name], full[name], rtol=1e-5, atol=1e-7)
    truncated = gradients_after_trainer("3", task, batch)   # the comparison can tell them apart
    assert not torch.allclose(truncated["trainer.core.weight_hh_l0"],
                              full["trainer.core.weight_hh_l0"], rtol=1e-3, atol=1e-6)


def test_stalled_means_no_level_growth_in_the_last_quarter():
    assert curriculum_stalled([], 1000)
    assert curriculum_stalled([[100, 2], [500, 3]], 1000)
    assert curriculum_stalled([[750, 3]], 1000)          # step 750 is in the first 3 quarters
    assert not curriculum_stalled([[751, 3]], 1000)
    assert not curriculum_stalled([[100, 2], [999, 3]], 1000)
    assert not curriculum_stalled([[40, 2]], 40, last_fraction=1.0)
    assert curriculum_stalled([[999, 6]], 1000, solved=6, last_level=6)    # its last level
    assert not curriculum_stalled([[999, 6]], 1000, solved=5, last_level=6)


@pytest.mark.parametrize("max_length, last_growth, stalled", [(64, [8, 9], False),
                                                              (8, [7, 8], True)])
def test_short_run_summary_says_whether_it_stalled(tmp_path, max_length, last_growth, stalled):
    """Every step solves its level: the level grows in the last quarter, unless the run solved
    its last level (--max-length) and could grow no more."""
    from experiment.rnn_train import train

    args = parse_args(["--task", "copy", "--method", "bptt", "--truncation", "0", "--steps",
                       "8", "--batch-size", "2", "--hidden", "4", "--device", "cpu",
                       "--threads", "1", "--log-every", "0", "--threshold", "100",
                       "--window", "1", "--max-length", str(max_length),
                       "--out", str(tmp_path / "run")])
    summary = train(args)
    assert summary["truncation"] == 0 and summary["levels"][-1] == last_growth
    assert summary["max_length_solved"] == 8 and summary["stalled"] is stalled


def write_summary(folder, length, levels, steps=30000, hidden=128, batch=32, seconds=60.0):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "max_length_solved": length, "levels": levels, "steps": steps, "hidden": hidden,
        "batch_size": batch, "train_seconds": seconds}))


def test_table_renders_median_range_stalled_mark_and_budget(tmp_path):
    for seed, (length, last_growth) in enumerate([(2, 100), (5, 29000), (3, 200)]):
        write_summary(tmp_path / run_name("copy", "bptt", 3, seed), length,
                      [[last_growth, length + 1]])
        write_summary(tmp_path / run_name("copy", "dni", 3, seed), 4, [[1000, 5]])
        write_summary(tmp_path / run_name("copy", "bptt", 0, seed), 9, [[20000, 10]])
    text = table(tmp_path, ["copy"], ["bptt", "dni", "dni_aux"], [0, 3], [0, 1, 2])
    caption, _, head, _, full, t3 = text.splitlines()
    assert "30,000 steps a run, LSTM 128, batch 32" in caption and "seeds 0 1 2" in caption
    assert head == "| task | T | BPTT | DNI | DNI+Aux | seeds | s/run |"
    assert full == "| copy | full | 9 (9-9) |  |  | 3 | 60 |"     # BPTT only, untruncated
    assert t3 == "| copy | 3 | 3 (2-5)* | 4 (4-4) | - | 0 | 60 |"  # seed 1 still grew


def test_cell_of_one_seed_and_of_none():
    assert cell([4]) == "4" and cell([]) == "-" and cell([2, 3], growing=True) == "2.5 (2-3)*"
    assert cell([91.04, 88.2, 89.55], digits=1) == "89.5 (88.2-91.0)"   # mnist_rows, %


def test_bench_runs_the_untruncated_row_then_extends_it_to_a_larger_budget(tmp_path):
    def bench(steps):
        return run_bench("--tasks", "copy", "--truncations", "0", "--seeds", "0", "--results",
                         tmp_path, "--steps", steps, "--batch-size", "2", "--hidden", "4").stdout

    first = bench(4)
    folder = tmp_path / run_name("copy", "bptt", 0, 0)
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]     # BPTT alone untruncated
    assert "| copy | full | 0 |  |  | 1 |" in first and "4 steps a run" in first
    bench(6)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["truncation"] == 0
    rows = (folder / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[1] for row in rows[1:]] == ["4", "6"]   # one run, continued


def test_a_variant_method_runs_rnn_tasks_with_its_flag_in_its_own_folders(tmp_path):
    out = run_bench("--tasks", "copy", "--truncations", "2", "--seeds", "0", "--methods", "dni",
                    "dni_inputs", "--results", tmp_path, "--steps", "3", "--batch-size", "2",
                    "--hidden", "4", "--input-window", "3").stdout
    configs = {name: json.loads((tmp_path / run_name("copy", name, 2, 0) / "config.json")
                                .read_text())["args"] for name in ("dni", "dni_inputs")}
    assert configs["dni_inputs"]["synth_input_window"] == 3
    assert configs["dni"]["synth_input_window"] == 0
    assert configs["dni_inputs"]["method"] == configs["dni"]["method"] == "dni"
    assert "| task | T | DNI | DNI, S sees 3 inputs | seeds | s/run |" in out


def test_a_folder_of_another_input_window_is_refused(tmp_path):
    from bench.rnn import check_variant
    from experiment.errors import UserError

    folder = tmp_path / run_name("copy", "dni_inputs", 2, 0)
    folder.mkdir()
    check_variant(folder, "dni_inputs")                      # nothing recorded yet
    (folder / "config.json").write_text(json.dumps({"args": {"synth_input_window": 8}}))
    with pytest.raises(UserError, match=f"--synth-input-window 8, not dni_inputs.s {INPUT_WINDOW}"):
        check_variant(folder, "dni_inputs")
    (folder / "config.json").write_text(json.dumps({"args": {"synth_input_window": INPUT_WINDOW}}))
    check_variant(folder, "dni_inputs")
    with pytest.raises(UserError):
        check_variant(folder, "dni")
    (folder / "config.json").write_text(json.dumps({"args": {"method": "dni"}}))   # older run
    check_variant(folder, "dni")


def test_a_finished_run_of_another_window_stops_the_bench_before_anything_trains(tmp_path):
    def bench(window, *seeds):
        return run_bench("--tasks", "copy", "--truncations", "2", "--seeds", *seeds, "--methods",
                         "dni_inputs", "--results", tmp_path, "--steps", "2", "--batch-size", "2",
                         "--hidden", "4", "--input-window", window, check=False)

    assert bench("3", "0").returncode == 0
    refused = bench("5", "0", "1")
    assert refused.returncode == 2 and "--synth-input-window 3, not" in refused.stderr
    assert not (tmp_path / run_name("copy", "dni_inputs", 2, 1)).exists()   # nothing trained


def test_a_diverged_run_is_recorded_with_its_length_and_marked_in_the_table(tmp_path):
    from bench.rnn import record_divergence

    folder = tmp_path / run_name("copy", "dni", 3, 1)
    folder.mkdir()
    (folder / "metrics.csv").write_text(
        "kind,step,level,max_length_solved\nstep,100,3,2\nstep,200,4,3\n")
    record = record_divergence(folder, "training diverged: non-finite loss at step 250")
    assert record["max_length_solved"] == 3 and record["last_logged_step"] == 200
    for seed, length in ((0, 5), (2, 4)):
        write_summary(tmp_path / run_name("copy", "dni", 3, seed), length, [[10, length + 1]])
    caption, _, _, _, row = table(tmp_path, ["copy"], ["dni"], [3], [0, 1, 2]).splitlines()
    assert row == "| copy | 3 | 4 (3-5)\u2020 | 3 | 60 |"      # its length counts, marked
    assert "\u2020: a seed diverged" in caption and "30,000 steps a run" in caption


def test_the_bench_goes_on_past_a_diverged_run_and_does_not_retry_it(tmp_path):
    def bench():
        return run_bench("--tasks", "copy", "--truncations", "2", "--seeds", "0", "1", "--methods",
                         "dni", "--results", tmp_path, "--steps", "3", "--batch-size", "2",
                         "--hidden", "4", "--lr", "1e30", "--synth-lr", "1e30").stdout

    first = bench()
    for seed in (0, 1):                              # the second seed ran after the first diverged
        record = json.loads((tmp_path / run_name("copy", "dni", 2, seed) / "diverged.json")
                            .read_text())
        assert record["diverged"] and record["error"].startswith("training diverged")
        assert f"copy-dni-T2-s{seed}: diverged (training diverged" in first
    assert "| copy | 2 | 0 (0-0)\u2020 | 2 |" in first
    again = bench()
    assert ": diverged (" not in again and "| copy | 2 | 0 (0-0)\u2020 | 2 |" in again


def test_the_newer_of_a_runs_diverged_and_summary_records_counts(tmp_path):
    import os

    from bench.rnn import run_record, target_steps

    folder = tmp_path / run_name("copy", "dni", 3, 0)
    write_summary(folder, 3, [[10, 4]], steps=100)
    (folder / "diverged.json").write_text(json.dumps({"diverged": True, "max_length_solved": 5,
                                                      "error": "training diverged"}))
    summary, diverged = folder / "summary.json", folder / "diverged.json"
    os.utime(summary, ns=(1, 1))                    # extended past its summary, then diverged
    assert run_record(folder)["diverged"] and target_steps(folder, 10**6) is None
    os.utime(diverged, ns=(0, 0))                   # resumed by hand after it diverged
    assert "diverged" not in run_record(folder) and target_steps(folder, 200) == 200


def test_a_failure_that_is_not_divergence_stops_the_bench(tmp_path):
    (tmp_path / "a-file").write_text("")
    result = run_bench("--tasks", "mnist_rows", "--truncations", "7", "--seeds", "0", "1",
                       "--methods", "dni", "--results", tmp_path / "runs", "--steps", "3",
                       "--batch-size", "2", "--hidden", "4", "--data-dir",
                       tmp_path / "a-file" / "data", check=False)
    assert result.returncode == 2, result.stderr
    assert "run mnist_rows-dni-T7-s0 failed (exit 2)" in result.stderr
    assert not list(tmp_path.glob("runs/*/diverged.json"))
    assert not (tmp_path / "runs" / run_name("mnist_rows", "dni", 7, 1)).exists()  # stopped


def test_a_relative_results_folder_is_the_callers_where_the_runs_land_and_are_read(tmp_path):
    out = run_bench("--tasks", "copy", "--truncations", "0", "--seeds", "0", "--results", "here",
                    "--steps", "2", "--batch-size", "2", "--hidden", "4", cwd=tmp_path).stdout
    assert (tmp_path / "here" / run_name("copy", "bptt", 0, 0) / "summary.json").exists()
    assert "| copy | full | 0 |  |  | 1 |" in out


def test_until_stalled_extends_a_growing_run_until_its_last_quarter_is_flat(tmp_path):
    from bench.rnn import target_steps

    folder = tmp_path / "run"
    assert target_steps(folder, 60000, 240000) == 60000                  # not started
    write_summary(folder, 5, [[15239, 5], [58386, 6]], steps=60000)
    (folder / "checkpoint.pt").write_bytes(b"")
    assert target_steps(folder, 60000) is None                           # off: done
    assert target_steps(folder, 60000, 240000) == 78000    # 4/3 of 58,386, a tenth at a time
    assert target_steps(folder, 60000, 70000) == 70000                   # the most
    assert target_steps(folder, 90000, 240000) == 90000                  # a larger --steps
    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, "steps": 78000}))
    assert target_steps(folder, 60000, 240000) is None                   # 58,386 <= 58,500
    at_most = {**summary, "steps": 60000, "max_length_solved": 6, "final_length": 6}
    (folder / "summary.json").write_text(json.dumps(at_most))
    assert target_steps(folder, 60000, 240000) is None      # its last level solved: can't grow
    (folder / "summary.json").write_text(json.dumps({**summary, "steps": 60000}))
    (folder / "checkpoint.pt").unlink()
    assert target_steps(folder, 60000, 240000) is None          # nothing to go on from


@pytest.mark.parametrize("most", [40, 7])
def test_the_bench_goes_on_with_a_growing_run_until_it_stalls_or_its_most(tmp_path, most):
    out = run_bench("--tasks", "copy", "--truncations", "0", "--seeds", "0", "--results",
                    tmp_path, "--steps", "4", "--until-stalled", most, "--batch-size", "2",
                    "--hidden", "4", "--bits", "2", "--threshold", "6", "--window", "2",
                    "--max-length", "5", timeout=120).stdout
    folder = tmp_path / run_name("copy", "bptt", 0, 0)
    if most == 7:                                   # still growing at its most: stops there
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["steps"] == 7 and not summary["stalled"] and "| copy | full | 3* |" in out
        return
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["levels"][-1] == [8, 5] and summary["steps"] == 11 and summary["stalled"]
    rows = (folder / "metrics.csv").read_text().splitlines()[1:]
    assert [row.split(",")[1] for row in rows] == ["4", "6", "8", "11"]   # one run, continued
    assert "(still growing) at 4 steps" in out and "(stalled) at 11 steps" in out
    assert "goes on until that quarter is flat, to at most 40 steps" in out
