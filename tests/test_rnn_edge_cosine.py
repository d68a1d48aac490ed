"""bench/probes/rnn_edge_cosine.py: its per-edge figures are the cosines and norm ratios of
TruncatedBPTT's (synthetic, true) future gradients on its own batches, it leaves the run's
training as it was, and it draws what it wrote."""

import csv

import pytest
import torch

from bench.probes.rnn_edge_cosine import BATCHES, edge_cosines, main
from experiment.figures import load_edge_cosines
from experiment.rnn_train import make_loop, parse_args, train

TINY = ["--task", "copy", "--method", "dni", "--truncation", "2", "--hidden", "8",
        "--batch-size", "4", "--threads", "1", "--seed", "3"]


def test_edge_figures_are_the_future_gradients_cosines_and_norm_ratios(tmp_path):
    loop = make_loop(parse_args([*TINY, "--out", str(tmp_path)]))
    with torch.no_grad():                     # an untrained S sends zeros: give it a direction
        for p in loop.model.trainer.synthesizer.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    level = 4                                 # 9 steps: edges at t = 2, 4, 6, 8
    got = edge_cosines(loop, level)
    generator = torch.Generator().manual_seed(10_000 + loop.state.step)
    expected: dict[int, list[float]] = {}
    for _ in range(BATCHES):
        batch = loop.task.sample(level, 4, generator, loop.device)
        pairs = loop.model.trainer.future_gradients(batch.inputs, loop.task.loss_of(batch))
        for edge, (s, t) in enumerate(pairs, start=1):
            cosine = (s.flatten() @ t.flatten()) / (s.norm() * t.norm())
            expected.setdefault(edge, []).append([cosine.item(), (s.norm() / t.norm()).item()])
    assert [e for e, _, _ in got] == [1, 2, 3, 4]
    for edge, cosine, ratio in got:
        mean = torch.tensor(expected[edge]).mean(0)
        assert cosine == pytest.approx(mean[0].item(), abs=1e-5)
        assert ratio == pytest.approx(mean[1].item(), rel=1e-5)
        assert ratio > 0


def test_probe_leaves_the_run_as_rnn_tasks_trains_it_and_draws_its_records(tmp_path):
    plain = tmp_path / "plain"
    train(parse_args([*TINY, "--steps", "30", "--log-every", "10", "--out", str(plain)]))
    probed = tmp_path / "probed"
    main([*TINY, "--steps", "30", "--log-every", "10", "--out", str(probed)])
    weights = [torch.load(d / "checkpoint.pt", weights_only=False)["model"] for d in (plain, probed)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    rows = list(csv.DictReader((probed / "edge_cosine.csv").open()))
    assert {int(r["step"]) for r in rows} == {10, 20, 30}
    for r in rows:                           # copy: 2N + 1 steps, an edge every 2
        assert 1 <= int(r["edge"]) <= (2 * int(r["length"])) // 2
        assert int(r["length"]) in (int(r["level"]), int(r["level"]) + 1)
    curves = load_edge_cosines(probed)
    assert (True, 1) in curves and [s for s, _ in curves[(True, 1)]] == [10, 20, 30]
    png = tmp_path / "edges.png"
    main(["figure", str(png), str(probed)])
    assert png.stat().st_size > 1000


def test_probe_refuses_bptt_and_a_damaged_record(tmp_path):
    with pytest.raises(SystemExit, match="needs a synthesizer"):
        main([*TINY[:2], "--method", "bptt", "--out", str(tmp_path / "b")])
    (tmp_path / "edge_cosine.csv").write_text("step,level\n1\n")
    with pytest.raises(Exception, match="edge_cosine.csv"):
        load_edge_cosines(tmp_path)
