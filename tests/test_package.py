"""The installed package: its public names import from outside the repository and load torch
only when used; the scripts answer --help and bad flags before torch loads."""

import subprocess
import sys

import pytest

PUBLIC = ("DNI, Synthesizer, LinearSynthesizer, LinearSigmoidSynthesizer, RNNSynthesizer, "
          "DNI_Network, Linear_DNI, Linear_Sigmoid_DNI, RNN_DNI")


def test_public_names_import_from_outside_the_repo(tmp_path):
    code = f"from dni import {PUBLIC}; import dni; print(dni.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("__init__.py")


def test_the_seed_names_are_the_classes():
    import dni

    assert dni.Linear_DNI is dni.LinearSynthesizer and dni.RNN_DNI is dni.RNNSynthesizer
    assert dni.Linear_Sigmoid_DNI is dni.LinearSigmoidSynthesizer
    assert dni.DNI_Network is dni.Synthesizer
    assert issubclass(dni.Linear_DNI, dni.DNI_Network)


LAYERS = {"dni": 0, "model": 1, "experiment": 2}   # lower layers never import higher ones
SCRIPTS = {"main", "mlp", "cnn", "rnn_tasks", "bench", "misc", "tests"}


def imported_modules(path):
    """The top-level names of every module a source file imports (at any depth of the code)."""
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_imports_run_down_from_experiment_to_model_to_dni():
    from tests.conftest import ROOT

    files = [*(ROOT / "dni").rglob("*.py"), ROOT / "model.py", *(ROOT / "experiment").rglob("*.py")]
    assert len(files) > 10
    for path in files:
        layer = LAYERS[path.relative_to(ROOT).parts[0].removesuffix(".py")]
        for name in imported_modules(path):
            assert name not in SCRIPTS, f"{path.name} imports the script or folder {name}"
            assert LAYERS.get(name, -1) <= layer, f"{path.name} (layer {layer}) imports {name}"


TORCH_BLOCKED = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch was imported")
sys.meta_path.insert(0, NoTorch())
"""


def test_importing_the_package_loads_torch_only_when_a_name_is_used(tmp_path):
    code = TORCH_BLOCKED + ("import dni, dni.pipeline\n"
                            "assert dni.pipeline.INTERFACE_MODES == ('edges', 'all')\n"
                            "assert set(dni.__all__) <= set(dir(dni))\n"
                            "try:\n    dni.DNI\nexcept ImportError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch was imported"   # the blocker did stop DNI's import


def test_every_public_name_is_its_modules_object():
    import importlib

    import dni
    import dni.pipeline

    for package, expected in ((dni, 19), (dni.pipeline, 11)):
        assert len(package.__all__) == expected
        namespace = {}
        exec(f"from {package.__name__} import *", namespace)  # noqa: S102 (what is tested)
        for name in package.__all__:
            value = getattr(package, name)
            assert namespace[name] is value
            home = getattr(value, "__module__", None)
            if home is not None and home.startswith(package.__name__ + "."):
                assert getattr(importlib.import_module(home), name, value) is value
    assert dni.pipeline.PipelineStage.__module__ == "dni.pipeline.stage"
    try:
        dni.NoSuchName  # noqa: B018
    except AttributeError as exc:
        assert "no attribute 'NoSuchName'" in str(exc)
    else:
        raise AssertionError("an unknown name did not raise AttributeError")


@pytest.mark.parametrize("script, argv, exit_code, says", [
    ("main.py", ["--help"], 0, "--synth-lr"),
    ("main.py", ["--epochs", "0"], 2, "error: argument --epochs"),
    ("main.py", ["--interfaces", "edges"], 2, "error: --interfaces edges needs torchrun"),
    ("main.py", ["--message-dtype", "float16"], 2, "error: argument --message-dtype"),
    ("main.py", ["--resume", "{tmp}/nowhere"], 2, "error: --resume"),
    ("mlp.py", ["--width", "-3"], 2, "error: argument --width"),
    ("cnn.py", ["--help"], 0, "--channels"),
])
def test_scripts_answer_help_and_bad_flags_without_loading_torch(tmp_path, script, argv,
                                                                 exit_code, says):
    from tests.conftest import ROOT

    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = TORCH_BLOCKED + (f"sys.argv = {[script, *argv]!r}\n"
                            f"runpy.run_path({script!r}, run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    assert result.returncode == exit_code, result.stderr
    assert says in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
