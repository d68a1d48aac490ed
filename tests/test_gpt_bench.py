"""bench/gpt.py, the GPT bench: PyTorch's pipeline schedules on a tiny GPT give one-process
backprop's gradients; every worker row trains the GPT as lm.py's bp does (same weights, same
windows, same validation curve); time to a target, the table and the records of an edge
pipeline run (faked: a run folder as lm.py under torchrun writes it); a rerun skips the rows
it has. A small text made here stands in for the corpus."""

import json
import os
import subprocess
import sys

import pytest
import torch

from bench.gpt import (
    default_target,
    render_table,
    row_record,
    shown_steps,
    stage_counts,
    time_to_target,
)
from experiment.figures import draw_time_curves
from experiment.lm_train import token_loss
from model import GPT
from tests.conftest import ROOT, free_port, torchrun_env

VOCAB = 7
TINY = ["--width", "16", "--layers", "2", "--heads", "2", "--context", "8", "--batch-size",
        "8", "--microbatches", "4", "--lr", "1e-2", "--device", "cpu"]

RANK_SCRIPT = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from bench.gpt import stage_counts
from bench.pipeline_schedules import schedule_step
from experiment.lm_train import token_loss
from model import GPT
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
grads = {{}}
for kind in ("gpipe", "1f1b", "zero-bubble"):
    torch.manual_seed(0)
    net = GPT({vocab}, width=16, layers=2, heads=2, context=8)
    ids = torch.randint({vocab}, (8, 9), generator=torch.Generator().manual_seed(1))
    step, params = schedule_step(kind, net, stage_counts(2), rank, 2, 4,
                                 torch.zeros(2, 8, dtype=torch.int64), token_loss,
                                 torch.device("cpu"))
    step(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
    grads[kind] = {{name: p.grad for name, p in net.named_parameters() if p.grad is not None}}
    assert {{id(p) for p in params}} == {{id(p) for p in net.parameters() if p.grad is not None}}
torch.save(grads, os.path.join({out!r}, f"grads{{rank}}.pt"))
dist.destroy_process_group()
"""


def test_pipeline_schedules_on_a_two_stage_gpt_give_backprops_gradients(tmp_path):
    """GPipe, 1F1B and zero-bubble (4 microbatches, the GPT cut after block 1) each leave on
    their two ranks, between them, every parameter's gradient of the batch's mean loss, as
    one-process backprop computes it on the same batch."""
    port = free_port()
    code = RANK_SCRIPT.format(root=str(ROOT), vocab=VOCAB, out=str(tmp_path))
    ranks = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                              **torchrun_env(rank, 2, port)})
             for rank in range(2)]
    errors = [rank.communicate(timeout=120)[1] for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), errors
    torch.manual_seed(0)
    net = GPT(VOCAB, width=16, layers=2, heads=2, context=8)
    ids = torch.randint(VOCAB, (8, 9), generator=torch.Generator().manual_seed(1))
    token_loss(net(ids[:, :-1]), ids[:, 1:]).backward()
    want = {name: p.grad for name, p in net.named_parameters()}
    got = [torch.load(tmp_path / f"grads{rank}.pt") for rank in range(2)]
    for kind in ("gpipe", "1f1b", "zero-bubble"):
        first, second = got[0][kind], got[1][kind]
        assert not set(first) & set(second), kind       # each parameter on one rank
        merged = {**first, **second}
        assert set(merged) == set(want), kind
        for name, grad in merged.items():
            torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6,
                                       msg=f"{kind} {name}")


def test_stage_counts_cut_after_the_middle_block():
    """Stage 0: the embedding and blocks 1..layers // 2; stage 1: the rest and the head."""
    assert stage_counts(4) == [3, 3]
    assert stage_counts(3) == [2, 3]
    assert stage_counts(2) == [2, 2]


def test_time_to_target_is_the_first_validation_at_or_below_it():
    curve = [(10, 1.0, 3.0), (20, 2.0, 2.5), (30, 3.0, 2.6), (40, 4.0, 2.2)]
    assert time_to_target(curve, 2.5) == 2.0      # reached exactly
    assert time_to_target(curve, 2.55) == 2.0     # the first at or below, not the closest
    assert time_to_target(curve, 2.3) == 4.0
    assert time_to_target(curve, 2.0) is None
    assert time_to_target([], 2.0) is None


def record(curve, tokens_per_s=1000.0, peaks=(300.0,), **extra):
    return {"tokens_per_s": tokens_per_s, "peak_mb": list(peaks), "memory": "RSS",
            "curve": curve, **extra}


def test_the_table_has_a_line_per_row_its_ratios_to_bp_and_says_what_failed():
    steps = [10, 20, 30, 40, 50, 60, 70]
    bp = record([(s, s / 10, 4 - s / 20) for s in steps])        # ends at 0.5
    slow = record([(s, s / 5, 4 - s / 20) for s in steps], tokens_per_s=500.0,
                  peaks=(200.0, 150.0))
    never = record([(s, s / 10, 3.0) for s in steps], peaks=(100.0, 90.0),
                   stage_times=[{"rank": 0, "total_s": 2.0, "compute_s": 1.0, "wait_s": 0.5,
                                 "comm_s": 0.5, "peak_memory_mb": 100.0}])
    records = {"bp": bp, "gpipe": slow, "dni": never, "cdni": {"failed": "no pipeline"}}
    target = default_target(records)
    assert target == 0.5
    assert shown_steps(records) == [10, 30, 50, 70]
    lines = render_table(records, target).splitlines()
    assert len(lines) == 2 + len(records)
    assert "s to 0.500 BPC" in lines[0] and "valid BPC @30" in lines[0]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in lines[2:]}
    assert cells["bp"][:3] == ["1000", "1.00x", "300"]
    assert cells["gpipe"][:3] == ["500", "0.50x", "200 / 150"]
    assert cells["gpipe"][-3:-1] == ["14.0", "2.00x"]          # bp reaches it at 7.0 s
    assert cells["dni"][-3:] == ["not reached", "", "s0 50/25/25"]
    assert cells["cdni"][0] == "failed: no pipeline"
    assert all(len(c) == len(lines[0].split("|")) - 3 for c in cells.values())
    assert "s to target" in render_table({"dni": never}, None)


def fake_edge_run(folder, stage_times=True):
    """A run folder as lm.py under torchrun writes it (metrics.csv rows, summary.json with
    each rank's stage times)."""
    from experiment.records import MetricsLog

    folder.mkdir(parents=True)
    log = MetricsLog(folder / "metrics.csv", ["train_seconds", "train_bpc", "valid_bpc"])
    for step, seconds, bpc in ((2, 0.5, 3.5), (4, 1.0, 3.0)):
        log.write({"kind": "step", "step": step, "wall_seconds": seconds + 1,
                   "train_seconds": seconds, "valid_bpc": bpc, "train_bpc": bpc})
    summary = {"valid_bpc": 3.0, "test_bpc": 3.1, "steps": 4, "train_seconds": 1.0}
    if stage_times:
        summary["stage_times"] = [
            {"rank": r, "total_s": 1.0, "wait_s": 0.1, "comm_s": 0.1, "compute_s": 0.8,
             "peak_memory_mb": 250.0 + r} for r in range(2)]
    (folder / "summary.json").write_text(json.dumps(summary))


def test_an_edge_pipeline_runs_records_give_its_row(tmp_path):
    """tokens/s from the summary's steps and training seconds, each stage's peak memory from
    its stage times, the validation curve from metrics.csv; a run without stage times (lm.py
    without the edge pipeline) is a failed row."""
    fake_edge_run(tmp_path / "dni")
    got = row_record("dni", tmp_path / "dni", batch_tokens=64)
    assert got["tokens_per_s"] == 4 * 64 / 1.0
    assert got["peak_mb"] == [250.0, 251.0]
    assert got["curve"] == [(2, 0.5, 3.5), (4, 1.0, 3.0)]
    assert len(got["stage_times"]) == 2
    fake_edge_run(tmp_path / "cdni", stage_times=False)
    assert "no stage_times" in row_record("cdni", tmp_path / "cdni", 64)["failed"]


def test_the_figure_draws_each_row_and_names_the_empty_ones(tmp_path):
    path = draw_time_curves({"bp": [(1.0, 3.0), (2.0, 2.5)], "dni": []}, tmp_path / "f.png",
                            target=2.5)
    assert path.stat().st_size > 0


@pytest.fixture(scope="module")
def bench_run(small_text, tmp_path_factory):
    """bench/gpt.py's bp, gpipe and ddp rows on the small text, with a finished dni row
    (faked) already in its results folder; then the same command again."""
    results = tmp_path_factory.mktemp("bench-gpt")
    argv = [sys.executable, "bench/gpt.py", *TINY, "--corpus", str(small_text), "--steps",
            "6", "--eval-every", "3", "--eval-chars", "400", "--results", str(results),
            "--rows", "bp", "gpipe", "ddp", "dni"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fake_edge_run(results / "dni")
    from bench.gpt import build_parser, run_config

    config = run_config(build_parser().parse_args(argv[2:]))
    config["corpus"] = str(small_text)
    dni = {"row": "dni", **row_record("dni", results / "dni", 64), "config": config}
    (results / "dni.json").write_text(json.dumps(dni))
    first = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300, check=False)
    again = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120, check=False)
    return results, first, again


def test_every_worker_row_trains_the_gpt_as_backprop_does(bench_run):
    """bp (lm.py), gpipe and ddp start from the same weights, see the same windows and
    validate on the same characters, so their curves agree; the loss falls; each process's
    peak memory is there."""
    results, first, _ = bench_run
    assert first.returncode == 0, first.stderr[-2000:]
    records = {row: json.loads((results / f"{row}.json").read_text())
               for row in ("bp", "gpipe", "ddp")}
    for row, got in records.items():
        assert "failed" not in got, (row, got)
        assert [s for s, _, _ in got["curve"]] == [3, 6], row
        assert got["curve"][-1][2] < got["curve"][0][2], row
        assert got["tokens_per_s"] > 0 and got["steps"] == 6
        assert len(got["peak_mb"]) == (1 if row == "bp" else 2)
        assert all(p > 50 for p in got["peak_mb"])
        for (_, _, bpc), (_, _, want) in zip(got["curve"], records["bp"]["curve"]):
            assert bpc == pytest.approx(want, abs=1e-4), row


def test_the_bench_prints_and_writes_the_table_and_figure_and_a_rerun_skips_its_rows(
        bench_run):
    results, first, again = bench_run
    assert again.returncode == 0, again.stderr[-2000:]
    assert first.stdout.count("\n$ ") == 3      # bp, gpipe, ddp; the finished dni row read
    assert "\n$ " not in again.stdout           # every row finished: nothing runs
    table = (results / "table.md").read_text()
    assert table.strip() in again.stdout
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["bp", "gpipe", "ddp", "dni"]
    assert "bp at its last step" in table
    assert (results / "gpt_bpc_time.png").stat().st_size > 0


def test_a_row_finished_with_other_flags_is_refused_not_mixed_in(tmp_path):
    from bench.gpt import build_parser, gather_records, run_config
    from experiment.errors import UserError

    argv = ["--results", str(tmp_path), "--rows", "dni", "--steps", "20"]
    args = build_parser().parse_args(argv)
    fake_edge_run(tmp_path / "dni")
    old = {**run_config(args), "steps": 10}
    (tmp_path / "dni.json").write_text(json.dumps(
        {"row": "dni", **row_record("dni", tmp_path / "dni", 64), "config": old}))
    with pytest.raises(UserError, match="its dni row ran with other --steps"):
        gather_records(args)
    old["steps"] = 20       # the same flags: read back, nothing runs
    (tmp_path / "dni.json").write_text(json.dumps(
        {"row": "dni", **row_record("dni", tmp_path / "dni", 64), "config": old}))
    assert gather_records(args)["dni"]["peak_mb"] == [250.0, 251.0]
