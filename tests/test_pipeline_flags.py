"""main.py's flags around the pipeline: those only a pipeline uses are refused in one process
(before torch loads), and --baseline draws its figures under torchrun too."""

import json
import os
import subprocess
import sys

import pytest

from experiment.figures import FIGURES
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


def test_baseline_under_torchrun_draws_the_figures(mnist_root, tmp_path):
    """A 2-stage pipeline with --baseline ends with the figures of both runs in its folder,
    drawn once (by the last stage, which holds the records)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    baseline = subprocess.run([sys.executable, "mlp.py", *TINY, "--out", tmp_path / "mlp"],
                              cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                              timeout=300)
    assert baseline.returncode == 0, baseline.stderr
    out = tmp_path / "pipe"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "main.py", *TINY,
                           "--baseline", tmp_path / "mlp", "--out", out],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    for name in FIGURES:
        assert (out / name).stat().st_size > 0, name
        assert done.stdout.count(f"figure: {out / name}") == 1, done.stdout
