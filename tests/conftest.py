"""Shared fixtures: the repository root, MNIST materialised once, and a script runner."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def mnist_root():
    """The repository's data folder with the four verified MNIST files."""
    from experiment.data import materialise_mnist

    materialise_mnist(ROOT / "data")
    return ROOT / "data"


@pytest.fixture(scope="session")
def run_script(mnist_root):
    """Run one of the project's scripts in a subprocess from the repository root."""

    def run(*argv, timeout=300):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)

    return run
