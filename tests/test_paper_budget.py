"""bench/paper_budget.py and bench/graph_check.py on the CPU: the graphs engine's runs resume
exactly after a stop, the scripts engine runs what the paper sets, and the GPU check's
comparison sees a difference."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.graph_check import relative_difference
from bench.paper_budget import RECENT, command, standing


def tiny(updates=12):
    """The graphs engine on the CPU: 4 updates an epoch, so 3 epochs of 12 updates."""
    return ["--engine", "graphs", "--device", "cpu", "--train-size", "1024", "--updates",
            str(updates), "--layers", "3", "--measure-every", "2"]


TINY = tiny()


def records(folder):
    """metrics.csv rows without the wall-clock column."""
    with open(folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in row.items() if k != "wall_seconds"} for row in rows]


def test_graphs_engine_stops_and_resumes_exactly(run_script, tmp_path):
    whole = run_script("bench/paper_budget.py", *TINY, "--results", tmp_path / "whole",
                       "--defaults", tmp_path / "none")
    assert whole.returncode == 0, whole.stderr
    assert "fcn3-dni: test error" in whole.stdout
    for _ in range(3):   # a stop after every epoch, then the same command again
        part = run_script("bench/paper_budget.py", *TINY, "--results", tmp_path / "parts",
                          "--defaults", tmp_path / "none", "--stop-after", "1e-9")
        assert part.returncode == 0, part.stderr
    assert "run the same command to go on" in part.stdout or "test error" in part.stdout
    for run in ("fcn3-dni", "fcn3-cdni", "fcn3-bp"):
        assert (tmp_path / "parts" / run / "summary.json").exists(), run
        assert not (tmp_path / "parts" / run / "checkpoint.pt").exists()
        rows = records(tmp_path / "whole" / run)
        assert [int(r["step"]) for r in rows] == [4, 8, 12]
        assert records(tmp_path / "parts" / run) == rows
    # the interfaces' cosines are measured on the epochs asked for (2) and the last (3)
    cosines = [r["cos1"] for r in records(tmp_path / "whole" / "fcn3-dni")]
    assert cosines[0] == "" and cosines[1] != "" and cosines[2] != ""


def test_scripts_engine_runs_the_papers_settings():
    bp, dni, cdni = (command(m, 3) for m in ("bp", "dni", "cdni"))
    paper = ["--depth", "2", "--batch-size", "256", "--lr", "3e-05", "--schedule", "step"]
    assert bp[:1] == ["mlp.py"] and all(flag in bp for flag in paper)
    assert dni[:3] == ["main.py", "--model_type", "mlp"]
    for flags in (dni, cdni):   # the paper's DNI: no centring, the synthesizers at 3e-5
        assert flags[flags.index("--center-gradients") + 1] == "False"
        assert flags[flags.index("--synth-lr") + 1] == "3e-05"
    assert dni[dni.index("--synthesizer") + 1] == "mlp"
    assert dni[dni.index("--synth-hidden") + 1] == "1024"
    assert cdni[cdni.index("--synthesizer") + 1] == "linear"
    assert cdni[cdni.index("--conditioned") + 1] == "True"


def test_standing_says_where_each_run_is(tmp_path):
    """The table's figures from a metrics.csv written by hand: the last error, the best and
    its update, the means over the last RECENT epochs (cosines where measured), the paper's."""
    folder = tmp_path / "fcn3-dni"
    folder.mkdir()
    accuracies = [0.90, 0.985, 0.97] + [0.975] * (RECENT - 2)   # the first falls out of RECENT
    lines = ["kind,step,epoch,wall_seconds,train_loss,test_loss,test_acc,cos1,cos2,cos3"]
    for epoch, acc in enumerate(accuracies, start=1):   # cos3 is never measured
        cosines = "0.1,0.3," if epoch == 2 else "0.3,0.5," if epoch % 2 else ",,"
        lines.append(f"epoch,{235 * epoch},{epoch},1.0,0.1,0.1,{acc},{cosines}")
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    table = standing(tmp_path, ["dni", "cdni"], [3])
    assert len(table) == 3                               # the header, its rule, one run
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    mean_error = (1.5 + 3.0 + 2.5 * (RECENT - 2)) / RECENT
    assert cells[:5] == ["DNI, FCN 3", f"{235 * len(accuracies):,} (epoch {len(accuracies)})",
                         "2.50%", "1.50% (470)", f"{mean_error:.2f}%"]
    assert cells[5] != "" and cells[6] == "1.9"
    odd = [e for e in range(3, len(accuracies) + 1) if e % 2]
    want = [(0.1 + 0.3 * len(odd)) / (1 + len(odd)), (0.3 + 0.5 * len(odd)) / (1 + len(odd))]
    assert cells[5] == " ".join(f"{c:.2f}" for c in want) + " -"
    (folder / "summary.json").write_text("{}")
    assert "(finished)" in standing(tmp_path, ["dni"], [3])[2]
    cut = tmp_path / "fcn4-dni"                          # as read mid-line, or mid-rewrite
    cut.mkdir()
    (cut / "metrics.csv").write_text(lines[0] + "\n" + lines[1][:12])
    row = standing(tmp_path, ["dni"], [3, 4])[3]
    assert row.startswith("| DNI, FCN 4 | unreadable: ") and "cut off" in row


def test_the_papers_unchecked_figures_carry_one_footnote(tmp_path):
    """While PAPER_VERIFIED is False, a printed table marks the paper's column with '*' and
    says once, below it, that those figures are unverified."""
    from bench.table1 import PAPER_FOOTNOTE, PAPER_VERIFIED

    assert PAPER_VERIFIED is False and PAPER_FOOTNOTE.startswith("* ")
    assert standing(tmp_path, ["dni"], [3])[0].endswith("| paper* |")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "bench/table1.py", "--table-only", "--models", "fcn",
                             "--results", str(tmp_path)], cwd=root, capture_output=True,
                            text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(the paper's* after 500k" in result.stdout
    assert result.stdout.count("unverified") == 1 and "recalled" not in result.stdout


def test_graph_check_sees_a_difference():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert relative_difference(a, b) == 0.0
    with torch.no_grad():
        b.weight[1, 2] += 1e-3 * b.weight.abs().max()
    assert relative_difference(a, b) == pytest.approx(1e-3, rel=1e-3)


def test_graph_check_script_runs(run_script):
    result = run_script("bench/graph_check.py", "--layers", "3", "--methods", "cdni",
                        "--steps", "2", "--timed", "2", "--train-size", "512", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "fcn3-cdni" in result.stdout and "no GPU" in result.stdout


def test_resume_refuses_other_budget_flags(run_script, tmp_path):
    first = run_script("bench/paper_budget.py", *TINY, "--methods", "bp", "--results", tmp_path,
                       "--defaults", tmp_path / "none", "--stop-after", "1e-9")
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "fcn3-bp" / "checkpoint.pt").exists()
    again = run_script("bench/paper_budget.py", *tiny(updates=16), "--methods", "bp", "--results", tmp_path,
                       "--defaults", tmp_path / "none")
    assert again.returncode == 2
    assert again.stderr.startswith("error:") and "'updates': 12" in again.stderr


def test_a_diverged_run_stops_alone(mnist_root, tmp_path, monkeypatch, capsys):
    import argparse
    import json

    import bench.paper_budget as budget
    from experiment.data import load_mnist

    build = budget.build_run

    def poisoned(method, layers, data, seed, results):
        run = build(method, layers, data, seed, results)
        if method == "bp":
            with torch.no_grad():
                next(run.model.parameters()).fill_(float("inf"))
        return run

    monkeypatch.setattr(budget, "build_run", poisoned)
    args = argparse.Namespace(updates=8, train_size=512, seed=0, results=tmp_path,
                              stop_after=float("inf"), checkpoint_every=1, measure_every=1,
                              print_every=1)
    data = load_mnist(mnist_root, "cpu", 512)
    assert budget.train_graphed([("cdni", 3), ("bp", 3)], data, args) == []
    assert "fcn3-bp diverged" in capsys.readouterr().out
    bp = json.loads((tmp_path / "fcn3-bp" / "summary.json").read_text())
    cdni = json.loads((tmp_path / "fcn3-cdni" / "summary.json").read_text())
    assert bp["diverged"] and bp["updates"] == 2      # stopped after its first epoch
    assert not cdni["diverged"] and cdni["updates"] == 8
    assert not (tmp_path / "fcn3-cdni" / "checkpoint.pt").exists()
