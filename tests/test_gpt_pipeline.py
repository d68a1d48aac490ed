"""lm.py --model gpt under torchrun (experiment/lm_pipeline.py): a 2-stage and a 4-stage GPT
pipeline at staleness 0 end parameter for parameter where one-process DNI with interfaces at
the same cuts ends; the frozen control equals one process's; a stopped run resumes exactly;
a killed stage ends the others with one `error:` line. A small text stands in for the
corpus; every run is a tiny GPT."""

import csv
import json
import signal
import time

import pytest
import torch

from experiment.lm_flags import even_cuts
from experiment.lm_pipeline import stage_counts
from tests.conftest import launch, run_records, torchrun

TINY = ["--model", "gpt", "--width", "16", "--heads", "2", "--context", "8",
        "--batch-size", "4", "--device", "cpu", "--eval-every", "5", "--steps", "10"]


def lm_flags(small_text, *extra):
    return [*TINY, "--corpus", small_text, *map(str, extra)]


def one_process(run_script, tmp_path, flags, name="one"):
    """lm.py in one process on one thread (as torchrun starts each stage); its run folder."""
    out = tmp_path / name
    done = run_script("lm.py", *flags, "--threads", "1", "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def pipeline(tmp_path, flags, world, name="pipe"):
    out = tmp_path / name
    done = torchrun([*flags, "--out", out], world=world, script="lm.py")
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def stage_blocks(out, world, layers):
    """The network's parameters from every stage's checkpoint, named as one process's
    (net.<child>.<name>)."""
    counts = stage_counts(even_cuts(layers, world), layers)
    merged, first = {}, 0
    for rank in range(world):
        state = torch.load(out / f"checkpoint-stage{rank}.pt", weights_only=True)["model"]
        for name, value in state.items():
            if name.startswith("blocks."):
                _, index, rest = name.split(".", 2)
                merged[f"net.{first + int(index)}.{rest}"] = value
        first += counts[rank]
    return merged


def rows_without_times(out):
    with open(out / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if not k.endswith("seconds")}
                for row in csv.DictReader(f)]


def assert_same_network(got: dict, want: dict):
    assert set(got) == set(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("world, layers", [(2, 2), (4, 3)])
def test_staleness_0_pipeline_ends_where_one_process_dni_does(small_text, run_script,
                                                              tmp_path, world, layers):
    """Each stage's blocks learn from the synthetic gradient at its output edge, which is fit
    on the gradient the stage above sends down: with no lag, that is one-process DNI with
    interfaces at the same cuts, to the bit (weights, validation and test BPC)."""
    flags = lm_flags(small_text, "--layers", layers)
    pipe = pipeline(tmp_path, [*flags, "--staleness", "0"], world)
    cuts = even_cuts(layers, world)
    one = one_process(run_script, tmp_path, [*flags, "--cuts", *cuts])
    _, want_summary, want_state = run_records(one)
    summary = json.loads((pipe / "summary.json").read_text())
    assert summary["processes"] == world and summary["cuts"] == cuts
    assert_same_network(stage_blocks(pipe, world, layers),
                        {k: v for k, v in want_state.items() if k.startswith("net.")})
    for key in ("valid_bpc", "test_bpc", "best_step"):
        assert summary[key] == want_summary[key], key
    assert [t["rank"] for t in summary["stage_times"]] == list(range(world))
    assert all(t["peak_memory_mb"] > 0 for t in summary["stage_times"])


def test_frozen_control_trains_only_the_top_stage_as_one_process(small_text, run_script,
                                                                  tmp_path):
    """--method frozen: the stages below the top cut never change and send nothing down; the
    top stage learns by backprop from its input, as one-process frozen does."""
    flags = lm_flags(small_text, "--layers", 2, "--method", "frozen")
    pipe = pipeline(tmp_path, flags, 2)
    one = one_process(run_script, tmp_path, flags)
    _, want_summary, want_state = run_records(one)
    got = stage_blocks(pipe, 2, 2)
    assert_same_network(got, {f"net.{k}": v for k, v in want_state.items()})
    torch.manual_seed(0)
    from model import GPT
    initial = GPT(want_summary["vocab_size"], width=16, layers=2, heads=2, context=8).state_dict()
    assert all(torch.equal(got[f"net.{k}"], v) for k, v in initial.items()
               if k.split(".")[0] in ("0", "1"))
    assert not torch.equal(got["net.3.1.weight"], initial["3.1.weight"])
    summary = json.loads((pipe / "summary.json").read_text())
    assert summary["valid_bpc"] == want_summary["valid_bpc"]


def test_sigterm_to_one_stage_then_resume_ends_as_uninterrupted(small_text, tmp_path):
    """SIGTERM to stage 0 mid-run: both stages save (pending synthesizer updates with them)
    and exit 143; --resume ends exactly where an uninterrupted run ends."""
    flags = lm_flags(small_text, "--layers", 2, "--conditioned", "--steps", "60",
                     "--eval-every", "10")
    reference = pipeline(tmp_path, flags, 2, name="whole")
    out = tmp_path / "run"
    procs = launch([*flags, "--out", out], script="lm.py")
    deadline = time.monotonic() + 120
    while not (out / "metrics.csv").exists() or \
            (out / "metrics.csv").read_text().count("\nstep,") < 1:
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    procs[0].send_signal(signal.SIGTERM)
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [143, 143], results
    assert not (out / "summary.json").exists(), "the run ended before the signal"
    done = torchrun(["--resume", out], script="lm.py")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_network(stage_blocks(out, 2, 2), stage_blocks(reference, 2, 2))
    for rank in range(2):   # the synthesizers too
        got = torch.load(out / f"checkpoint-stage{rank}.pt", weights_only=True)["model"]
        want = torch.load(reference / f"checkpoint-stage{rank}.pt", weights_only=True)["model"]
        for name in (n for n in want if n.startswith("interfaces.")):
            assert torch.equal(got[name], want[name]), (rank, name)
    assert rows_without_times(out) == rows_without_times(reference)
    summary, whole = (json.loads((d / "summary.json").read_text()) for d in (out, reference))
    for key in ("valid_bpc", "test_bpc", "best_step", "steps"):
        assert summary[key] == whole[key], key


def test_killed_stage_ends_the_other_with_one_error_line(small_text, tmp_path):
    flags = lm_flags(small_text, "--layers", 2, "--steps", "100000", "--eval-every", "10",
                     "--timeout", "30")
    out = tmp_path / "run"
    procs = launch([*flags, "--out", out], script="lm.py")
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-stage1.pt").exists():
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    procs[1].kill()
    start = time.monotonic()
    _, err = procs[0].communicate(timeout=60)
    assert time.monotonic() - start < 60
    assert procs[0].returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: stage 0: "), err
    procs[1].communicate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_stages_share_one_gpu_through_host_staged_messages(small_text, run_script,
                                                               tmp_path, monkeypatch):
    """Two stages on one GPU (NCCL refuses two ranks on one device): gloo carries the
    messages through host memory, and at staleness 0 the run scores as one process does on
    that GPU (to the GPU's rounding)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    flags = [*lm_flags(small_text, "--layers", 2), "--device", "cuda"]
    pipe = pipeline(tmp_path, [*flags, "--staleness", "0"], 2)
    one = one_process(run_script, tmp_path, flags)
    summary = json.loads((pipe / "summary.json").read_text())
    want = json.loads((one / "summary.json").read_text())
    assert summary["device"].startswith("cuda")
    assert abs(summary["valid_bpc"] - want["valid_bpc"]) < 1e-3
