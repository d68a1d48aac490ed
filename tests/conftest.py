"""Shared fixtures: the repository root, MNIST materialised once, a script runner, a small text
and a run folder's records."""

import csv
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# One thread a test process, and for the scripts it starts: two xdist workers on two cores,
# each with torch's default pool of a thread a core, oversubscribe the cores, and OpenMP's
# spinning threads then run a test several times slower (4x measured on a training test).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist_root():
    """The repository's data folder with the four verified MNIST files."""
    from experiment.data import materialise_mnist

    materialise_mnist(ROOT / "data")
    return ROOT / "data"


def run_python(*argv, cwd: Path = ROOT, timeout: float = 300, check: bool = False,
               **popen) -> subprocess.CompletedProcess:
    """Run one of the project's scripts in a subprocess started in `cwd` (the repository root
    by default), its output captured as text (`popen`: subprocess.run's other arguments, but
    not env, capture_output or text, which it sets)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, check=check, **popen)


@pytest.fixture(scope="session")
def run_script(mnist_root):
    """run_python, with MNIST materialised first."""
    return run_python


def free_port() -> int:
    """A TCP port free on loopback now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The environment torchrun gives one worker of a `world`-process job on one machine."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}


def launch(argv, world=2, wrap=None, script="main.py", **popen):
    """Start `script` once per rank as torchrun would (its environment variables), so the test
    holds every stage's process; `wrap` {rank: [program, its args]} runs it through that
    program on those ranks (e.g. tests/signal_at.py)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
               **torchrun_env(rank, world, port)}
        prefix = (wrap or {}).get(rank, [])
        procs.append(subprocess.Popen([sys.executable, *prefix, script, *map(str, argv)],
                                      cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, **popen))
    return procs


def torchrun(argv, world=2, timeout=300, script="main.py"):
    """Run `script` under torchrun and return the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(world), script, *map(str, argv)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    """A 6,000-character text of made-up words, a line each few words, as a file."""
    rng = random.Random(0)
    words = ["the", "and", "lord", "said", "unto", "them", "of", "light", "day", "was"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + "."
             for _ in range(240)]
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_records(out: Path):
    """A finished run's metrics.csv rows, summary.json and checkpointed model state."""
    import torch

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((out / "summary.json").read_text())
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    return rows, summary, state


def assert_same_run(got: Path, want: Path, summary_keys: tuple[str, ...]) -> None:
    """A resumed run's records equal an uninterrupted one's: every model tensor, every
    metrics.csv row but its times, and the summary's `summary_keys`."""
    import torch

    rows, summary, state = run_records(got)
    want_rows, want_summary, want_state = run_records(want)
    for key in want_state:
        assert torch.equal(state[key], want_state[key]), key
    drop = ("wall_seconds", "train_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == \
        [{k: v for k, v in r.items() if k not in drop} for r in want_rows]
    for key in summary_keys:
        assert summary[key] == want_summary[key], key
