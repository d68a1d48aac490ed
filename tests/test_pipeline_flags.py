"""main.py's flags around the pipeline: those only a pipeline uses are refused in one process,
before torch loads."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_package import TORCH_BLOCKED

TINY = ["--train-size", "256", "--batch-size", "64", "--epochs", "1", "--log-every", "2",
        "--device", "cpu"]


@pytest.mark.parametrize("argv", [["--stages", "1", "3"], ["--staleness", "1"],
                                  ["--staleness=0"], ["--message-dtype", "float32"],
                                  ["--timeout", "60"]])
def test_pipeline_flags_in_one_process_are_refused_before_torch_loads(argv):
    """Typed at all, even at the default's value, each says it needs torchrun."""
    flag = argv[0].split("=")[0]
    code = TORCH_BLOCKED + (f"sys.argv = {['main.py', *TINY, *argv]!r}\n"
                            "runpy.run_path('main.py', run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {flag} needs torchrun"), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_pipeline_flags_left_at_their_defaults_pass_in_one_process():
    """Untyped, the pipeline's flags keep their defaults and raise nothing."""
    code = TORCH_BLOCKED + ("sys.argv = ['main.py']\n"
                            "sys.path.insert(0, '.')\n"
                            "import main\n"
                            "args = main.parse_args()\n"
                            "print(args.stages, args.staleness, args.message_dtype, args.timeout)\n")
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "1", "float32", "60.0"]

