"""The bad-input sweep: the training, figure and bench scripts (lm.py's flags: test_lm.py), given
a user's mistake or a hostile environment, stop with exit status 2 and one `error:` line (no
traceback) that says what is wrong, and write nothing outside --out.

Each case is one command run in its own empty working folder. The cases run concurrently
(a few at a time) in one fixture; each test reads its own case's result."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, free_port, torchrun_env

RNN_DISK = 6_000  # bytes: the tiny recurrent run's config.json and metrics.csv fit, not its
#                   checkpoint (the MLP's: 100 kB)
TINY = ["--epochs", "1", "--train-size", "256", "--batch-size", "64", "--device", "cpu"]
RNN_TINY = ["--steps", "4", "--batch-size", "4", "--hidden", "8", "--device", "cpu",
            "--threads", "1", "--log-every", "2"]


@dataclass
class Case:
    """One bad input: the script, its flags (`{work}` is the case's folder, `{data}` the
    MNIST folder, `{main}`, `{mlp}`, `{rnn}` copies of finished runs), what the error line
    must say, and how it is run."""

    script: str
    argv: list[str]
    says: str
    prepare: Callable[[Path], None] | None = None   # damage the case's folder first
    world: int = 1                                  # processes, as torchrun starts them
    full_disk: int = 0            # bytes a file may reach before a write fails (0: no limit)
    env: dict = field(default_factory=dict)
    data: bool = True                               # pass --data-dir (training scripts)


def truncate(path: str, keep: float = 0.5) -> Callable[[Path], None]:
    def damage(work: Path) -> None:
        target = work / path
        data = target.read_bytes()
        target.write_bytes(data[:int(len(data) * keep)])
    return damage


def write(path: str, content: bytes | str) -> Callable[[Path], None]:
    def damage(work: Path) -> None:
        target = work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    return damage


def half_written_checkpoint(work: Path) -> None:
    """As a crash mid-write would leave it, were the write not atomic: only the temporary."""
    checkpoint = work / "main" / "checkpoint.pt"
    data = checkpoint.read_bytes()
    (work / "main" / ".checkpoint.pt.tmp").write_bytes(data[:len(data) // 3])
    checkpoint.unlink()


def foreign_checkpoint(work: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, work / "main" / "checkpoint.pt")


def damaged_data(kind: str) -> Callable[[Path], None]:
    def damage(work: Path) -> None:
        shutil.copytree(MNIST_ROOT / "MNIST", work / "data" / "MNIST",   # not a temporary
                        ignore=shutil.ignore_patterns(".*"))        # another worker writes
        path = work / "data" / "MNIST" / "raw" / "train-labels-idx1-ubyte"
        data = bytearray(path.read_bytes())
        if kind == "size":
            data = data[:-100]
        else:
            data[5000] ^= 1
        path.write_bytes(bytes(data))
    return damage


MNIST_ROOT = ROOT / "data"
GPU = torch.cuda.is_available()

CASES: dict[str, Case] = {
    # wrong types, signs and choices: main.py
    "main epochs zero": Case("main.py", ["--epochs", "0"], "--epochs"),
    "main epochs negative": Case("main.py", ["--epochs", "-2"], "--epochs"),
    "main epochs not a number": Case("main.py", ["--epochs", "many"], "--epochs"),
    "main batch size zero": Case("main.py", ["--batch-size", "0"], "--batch-size"),
    "main lr zero": Case("main.py", ["--lr", "0"], "--lr"),
    "main lr negative": Case("main.py", ["--lr", "-0.1"], "--lr"),
    "main lr not finite": Case("main.py", ["--lr", "nan"], "--lr"),
    "main lr beyond float32's reach": Case("main.py", ["--lr", "1e38"], "at most 1e+30"),
    "rnn lr beyond float32's reach": Case("rnn_tasks.py", ["--synth-lr", "1e38"], "--synth-lr",
                                          data=False),
    "main train size zero": Case("main.py", ["--train-size", "0"], "--train-size"),
    "main train size beyond the data": Case("main.py", [*TINY, "--train-size", "60001",
                                                        "--out", "{work}/out"], "--train-size"),
    "main unknown device": Case("main.py", ["--device", "tpu"], "--device"),
    "main unknown flag": Case("main.py", ["--bogus"], "--bogus"),
    "main unknown model": Case("main.py", ["--model_type", "rnn"], "--model_type"),
    "main conditioned not a boolean": Case("main.py", ["--conditioned", "maybe"], "--conditioned"),
    "main conv synthesizer on the mlp": Case("main.py", ["--synthesizer", "conv"], "conv"),
    "main synth lr zero": Case("main.py", ["--synth-lr", "0"], "--synth-lr"),
    "main log every negative": Case("main.py", ["--log-every", "-1"], "--log-every"),
    "main grad scale infinite": Case("main.py", ["--grad-scale", "inf"], "--grad-scale"),
    "main depth zero": Case("main.py", ["--depth", "0"], "--depth"),
    "main seed not an integer": Case("main.py", ["--seed", "abc"], "--seed"),
    "main staleness negative": Case("main.py", ["--staleness", "-1"], "--staleness"),
    "main interfaces at zero": Case("main.py", ["--interfaces-at", "0"], "--interfaces-at"),
    "main interfaces at the head": Case("main.py", ["--interfaces-at", "4"], "--interfaces-at"),
    "main interfaces at decreasing": Case("main.py", ["--interfaces-at", "2", "1"],
                                          "--interfaces-at"),
    "main interfaces at repeated": Case("main.py", ["--interfaces-at", "1", "1"],
                                        "--interfaces-at"),
    "main edges in one process": Case("main.py", ["--interfaces", "edges"], "torchrun"),
    # the pipeline's own flags, typed in one process (even at their defaults) beside flags
    # that would make a run
    "main stages in one process": Case(
        "main.py", [*TINY, "--stages", "1", "3", "--out", "{work}/out"],
        "--stages needs torchrun"),
    "main staleness in one process": Case(
        "main.py", [*TINY, "--staleness", "1", "--out", "{work}/out"],
        "--staleness needs torchrun"),
    "main message dtype in one process": Case(
        "main.py", [*TINY, "--message-dtype", "bfloat16", "--out", "{work}/out"],
        "--message-dtype needs torchrun"),
    "main timeout in one process": Case(
        "main.py", [*TINY, "--timeout", "60", "--out", "{work}/out"], "--timeout needs torchrun"),
    "main unknown interfaces": Case("main.py", ["--interfaces", "some"], "--interfaces"),
    "main interfaces all with interfaces at": Case(
        "main.py", ["--interfaces", "all", "--interfaces-at", "1"], "contradict"),
    "main unknown message dtype": Case("main.py", ["--message-dtype", "float16"],
                                       "--message-dtype"),
    # the baselines
    "mlp epochs zero": Case("mlp.py", ["--epochs", "0"], "--epochs"),
    "mlp batch size not a number": Case("mlp.py", ["--batch-size", "x"], "--batch-size"),
    "mlp width negative": Case("mlp.py", ["--width", "-3"], "--width"),
    "mlp unknown flag": Case("mlp.py", ["--conditioned"], "--conditioned"),
    "cnn channels zero": Case("cnn.py", ["--channels", "4", "0"], "--channels"),
    "cnn epochs fractional": Case("cnn.py", ["--epochs", "1.5"], "--epochs"),
    # the recurrent script
    "rnn unknown task": Case("rnn_tasks.py", ["--task", "sort"], "--task", data=False),
    "rnn unknown method": Case("rnn_tasks.py", ["--method", "bp"], "--method", data=False),
    "rnn truncation zero": Case("rnn_tasks.py", ["--truncation", "0"], "--truncation",
                                data=False),
    "rnn target decay of one": Case("rnn_tasks.py", ["--target-decay", "1"], "--target-decay",
                                    data=False),
    "rnn argmax too long": Case("rnn_tasks.py", ["--task", "argmax", "--max-length", "600"],
                                "--max-length", data=False),
    "rnn grad scale negative": Case("rnn_tasks.py", ["--grad-scale", "-1"], "--grad-scale",
                                    data=False),
    # the language-model table (lm.py's own flags: tests/test_lm.py)
    "bench lm truncation zero": Case("bench/lm.py", ["--truncations", "2", "0"],
                                     "--truncations", data=False),
    "bench lm profile without cost": Case("bench/lm.py", ["--profile"], "--profile",
                                          data=False),
    # the figure scripts
    "plot without a run": Case("misc/plot.py", [], "RUN_DIR", data=False),
    "plot of a missing folder": Case("misc/plot.py", ["{work}/nowhere", "--out", "{work}/out"],
                                     "no such run folder", data=False),
    "plot of a folder that is not a run": Case(
        "misc/plot.py", ["{work}/empty", "--out", "{work}/out"], "metrics.csv is missing",
        prepare=lambda w: (w / "empty").mkdir(), data=False),
    "plot of a cut-off metrics.csv": Case(
        "misc/plot.py", ["{main}", "--out", "{work}/out"], "cut off",
        prepare=truncate("main/metrics.csv", 0.7), data=False),
    "plot of an empty metrics.csv": Case(
        "misc/plot.py", ["{main}", "--out", "{work}/out"], "not a run's metrics.csv",
        prepare=write("main/metrics.csv", ""), data=False),
    "plot of a damaged metrics.csv": Case(
        "misc/plot.py", ["{main}", "--out", "{work}/out"], "damaged at line 3",
        prepare=write("main/metrics.csv", "kind,step,epoch\nstep,0,1\nstep,x,1\n"), data=False),
    "plot into a file": Case("misc/plot.py", ["{main}", "--out", "{work}/a-file/figures"],
                             "cannot write figures", prepare=write("a-file", ""), data=False),
    "plot_rnn of a missing folder": Case("misc/plot_rnn.py", ["{work}/nowhere"],
                                         "no such run folder", data=False),
    "plot_rnn of a cut-off metrics.csv": Case(
        "misc/plot_rnn.py", ["{rnn}", "--out", "{work}/out/length.png"], "cut off",
        prepare=truncate("rnn/metrics.csv", 0.7), data=False),
    # the bench scripts' flags
    "bench parallel stages zero": Case("bench/parallel.py", ["--stages", "0"], "--stages",
                                       data=False),
    "bench parallel unknown row": Case("bench/parallel.py", ["--rows", "fastest"], "--rows",
                                       data=False),
    "bench mnist epochs zero": Case("bench/mnist.py", ["--epochs", "0"], "--epochs", data=False),
    "bench mnist unknown model": Case("bench/mnist.py", ["--models", "rnn"], "--models",
                                      data=False),
    "bench rnn max runs negative": Case("bench/rnn.py", ["--max-runs", "-1"], "--max-runs",
                                        data=False),
    "bench rnn bad run flag": Case("bench/rnn.py", ["--steps", "-1"], "--steps", data=False),
    "bench baselines epochs negative": Case("bench/baselines.py", ["--mlp-epochs", "-1"],
                                            "--mlp-epochs", data=False),
    "bench table1 layers zero": Case("bench/table1.py", ["--layers", "0"], "--layers",
                                     data=False),
    "bench paper budget unknown method": Case("bench/paper_budget.py", ["--methods", "sgd"],
                                              "--methods", data=False),
    "bench one-epoch unknown variant": Case("bench/probes/dni_one_epoch.py", ["--variants", "best"],
                                            "--variants", data=False),
    # --resume of what cannot be resumed
    "resume a missing folder": Case("main.py", ["--resume", "{work}/nowhere"], "no such folder"),
    "resume a folder that is not a run": Case(
        "main.py", ["--resume", "{work}/empty"], "no config.json",
        prepare=lambda w: (w / "empty").mkdir()),
    "resume another script's run": Case("main.py", ["--resume", "{mlp}"], "made by mlp.py"),
    "resume a DNI run with rnn_tasks.py": Case("rnn_tasks.py", ["--resume", "{main}"],
                                               "made by main.py", data=False),
    "resume a corrupt checkpoint": Case("main.py", ["--resume", "{main}"], "not a checkpoint",
                                        prepare=write("main/checkpoint.pt", b"\x00" * 999)),
    "resume a truncated checkpoint": Case("main.py", ["--resume", "{main}"], "truncated",
                                          prepare=truncate("main/checkpoint.pt")),
    "resume a half-written checkpoint": Case("main.py", ["--resume", "{main}"],
                                             "no checkpoint.pt", prepare=half_written_checkpoint),
    "resume a foreign checkpoint": Case("main.py", ["--resume", "{main}"],
                                        "not a checkpoint written by this project",
                                        prepare=foreign_checkpoint),
    "resume a cut-off config.json": Case("main.py", ["--resume", "{main}"], "config.json",
                                         prepare=truncate("main/config.json")),
    "resume with another model": Case("main.py", ["--resume", "{main}", "--model_type", "cnn"],
                                      "--model_type cnn contradicts the run's mlp"),
    "resume with another batch size": Case("main.py", ["--resume", "{main}", "--batch-size",
                                                       "32"], "--batch-size 32 contradicts"),
    "resume with conditioning": Case("main.py", ["--resume", "{main}", "--conditioned"],
                                     "--conditioned True contradicts"),
    "resume a backprop run at another width": Case("mlp.py", ["--resume", "{mlp}", "--width",
                                                              "64"], "--width 64 contradicts"),
    "resume an rnn run with another method": Case(
        "rnn_tasks.py", ["--resume", "{rnn}", "--method", "bptt"], "--method bptt contradicts",
        data=False),
    # the environment
    "out under a file": Case("main.py", [*TINY, "--out", "{work}/a-file/run"], "--out",
                             prepare=write("a-file", "")),
    "out on a read-only file system": Case("mlp.py", [*TINY, "--out", "/sys/dni-bad-input-run"],
                                           "--out"),
    "out on a full disk": Case("main.py", [*TINY, "--out", "{work}/out"],
                               "cannot write {work}/out/checkpoint.pt", full_disk=100_000),
    "rnn out on a full disk": Case("rnn_tasks.py", [*RNN_TINY, "--out", "{work}/out"],
                                   "cannot write {work}/out/checkpoint.pt", full_disk=RNN_DISK,
                                   data=False),
    "data folder that cannot be made": Case(
        "mlp.py", [*TINY, "--data-dir", "{work}/a-file/data", "--out", "{work}/out"],
        "cannot create data folder", prepare=write("a-file", ""), data=False),
    "data file of the wrong size": Case(
        "mlp.py", [*TINY, "--data-dir", "{work}/data", "--out", "{work}/out"],
        "train-labels-idx1-ubyte is corrupt", prepare=damaged_data("size"), data=False),
    "data file with a flipped bit": Case(
        "main.py", [*TINY, "--data-dir", "{work}/data", "--out", "{work}/out"],
        "train-labels-idx1-ubyte is corrupt", prepare=damaged_data("bit"), data=False),
    "cuda without a GPU": Case("mlp.py", [*TINY, "--device", "cuda"], "no CUDA GPU"),
    # divergence from the first steps
    "main NaN from the first step": Case(
        "main.py", [*TINY, "--lr", "1e30", "--synth-lr", "1e30", "--out", "{work}/out"],
        "training diverged: non-finite"),
    "mlp NaN from the first step": Case("mlp.py", [*TINY, "--lr", "1e30", "--out", "{work}/out"],
                                        "training diverged: non-finite"),
    "rnn NaN from the first step": Case(
        "rnn_tasks.py", [*RNN_TINY, "--lr", "1e30", "--synth-lr", "1e30", "--out", "{work}/out"],
        "training diverged: non-finite", data=False),
    # under torchrun
    "pipeline with forward unlocking": Case("main.py", ["--forward-unlock"], "--forward-unlock",
                                            env={"WORLD_SIZE": "2"}),
    "pipeline with interfaces at": Case("main.py", ["--interfaces-at", "1"], "torchrun",
                                        env={"WORLD_SIZE": "2"}),
    "pipeline stages that do not sum": Case(
        "main.py", [*TINY, "--stages", "1", "1", "--out", "{work}/out"],
        "--stages: stage sizes [1, 1] must be positive and sum", world=2),
    "pipeline of more stages than blocks": Case(
        "main.py", [*TINY, "--depth", "1", "--out", "{work}/out"],
        "--stages: cannot split 2 blocks into 3 stages", world=3),
    "pipeline resume with other stages": Case(
        "main.py", ["--resume", "{main}", "--stages", "2", "2"], "--stages 2 2 contradicts"),
}
if GPU:
    del CASES["cuda without a GPU"]


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def on_a_full_disk(command: list[str], limit: int) -> list[str]:
    """`command` where a file cannot grow past `limit` bytes (a write past it fails with
    EFBIG, as on a full disk): bash's ulimit, with SIGXFSZ ignored so the write fails instead
    of killing the process."""
    return ["bash", "-c", f'trap "" XFSZ; ulimit -f {limit // 1024}; exec "$@"', "_", *command]


def run_case(name: str, case: Case, root: Path, runs: dict[str, Path]) -> dict:
    """Run one case in a fresh folder; return its processes' exit codes and outputs and the
    files it created."""
    work = root / name.replace(" ", "-")
    cwd = work / "cwd"
    cwd.mkdir(parents=True)
    for key, source in runs.items():
        if any(f"{{{key}}}" in a for a in case.argv):  # only the runs the case names
            shutil.copytree(source, work / key)
    if case.prepare:
        case.prepare(work)
    fill = {"work": str(work), "data": str(MNIST_ROOT),
            **{key: str(work / key) for key in runs}}
    argv = [a.format(**fill) for a in case.argv]
    if case.data:
        argv += ["--data-dir", str(MNIST_ROOT)]
    before = files_under(work)
    port = free_port()
    procs = []
    for rank in range(case.world):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **case.env}
        if case.world > 1:
            env.update(torchrun_env(rank, case.world, port))
        command = [sys.executable, str(ROOT / case.script), *argv]
        if case.full_disk:
            command = on_a_full_disk(command, case.full_disk)
        procs.append(subprocess.Popen(command, cwd=cwd, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [p.communicate(timeout=240) for p in procs]
    out = next((Path(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a == "--out"), None)
    resumed = next((Path(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a == "--resume"),
                   None)
    return {"codes": [p.returncode for p in procs], "outputs": outputs,
            "new": files_under(work) - before, "out": out or resumed,
            "says": case.says.format(**fill)}


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, mnist_root):
    """A finished tiny main.py, mlp.py and rnn_tasks.py run, copied into each case."""
    root = tmp_path_factory.mktemp("finished")
    commands = {"main": ["main.py", *TINY, "--log-every", "2", "--data-dir", mnist_root],
                "mlp": ["mlp.py", *TINY, "--log-every", "2", "--data-dir", mnist_root],
                "rnn": ["rnn_tasks.py", *RNN_TINY]}
    procs = {key: subprocess.Popen([sys.executable, *map(str, argv), "--out", str(root / key)],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True) for key, argv in commands.items()}
    for key, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, (key, err)
    return {key: root / key for key in commands}


@pytest.fixture(scope="module")
def results(tmp_path_factory, finished_runs):
    """Every case's result, run four at a time."""
    root = tmp_path_factory.mktemp("cases")
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_case, name, case, root, finished_runs)
                   for name, case in CASES.items()}
        return {name: future.result() for name, future in futures.items()}


def test_the_sweep_has_at_least_forty_distinct_cases_and_the_readme_counts_them():
    assert len(CASES) + GPU >= 40
    if not GPU:
        assert f"runs {len(CASES)} bad inputs" in (ROOT / "README.md").read_text()
    assert len({(c.script, tuple(c.argv), c.prepare, c.full_disk, c.world, tuple(c.env))
                for c in CASES.values()}) == len(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_stops_with_one_error_line(results, name):
    result = results[name]
    assert result["codes"] == [2] * len(result["codes"]), result
    errors = [line for _, err in result["outputs"] for line in err.strip().splitlines()]
    assert all("Traceback" not in err for _, err in result["outputs"]), result
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    assert result["says"] in errors[0], errors
    out = result["out"]
    outside = [p for p in result["new"] if out is None or not p.is_relative_to(out)]
    assert not outside, f"written outside --out: {sorted(map(str, outside))}"
    assert not [p for p in result["new"] if p.name.endswith(".tmp")], "a temporary stays"
