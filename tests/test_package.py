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
SCRIPTS = {"main", "mlp", "cnn", "rnn_tasks", "lm", "bench", "misc", "tests"}


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


def test_experiment_modules_import_each_other_without_a_circle():
    """No experiment module reaches itself through imports, at any depth of the code."""
    import ast
    from pathlib import Path

    imports = {}
    for path in (Path(__file__).resolve().parent.parent / "experiment").glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        imports[f"experiment.{path.stem}"] = {n for n in names if n.startswith("experiment.")}
    for start, direct in imports.items():
        seen, todo = set(), list(direct)
        while todo:
            name = todo.pop()
            assert name != start, f"{start} imports itself through {sorted(seen)}"
            if name not in seen:
                seen.add(name)
                todo.extend(imports.get(name, ()))


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
                            "try:\n    dni.DNI\nexcept ImportError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch was imported"   # the blocker did stop DNI's import


# every public name and the module that defines it, as they were before the names went lazy
PUBLIC_HOMES = {
    "dni": {
        "interface": "Interface synthesizer_loss", "recurrent": "SequenceReport TruncatedBPTT",
        "reference": "reference_step", "wrapper": "DNI SYNTHESIZERS synthesizer_factory",
        "synthesizers": "RNN_DNI ConvSynthesizer DNI_Network InputSynthesizer Linear_DNI "
                        "Linear_Sigmoid_DNI LinearSigmoidSynthesizer LinearSynthesizer "
                        "LossGradientSynthesizer MLPSynthesizer RNNSynthesizer SequenceConvSynthesizer "
                        "Synthesizer"},
    "dni.pipeline": {
        "split": "balanced_stages block_costs check_counts counted_split interface_positions "
                 "stage_costs synthesizer_costs",
        "stage": "PipelineStage", "transport": "PipelineError StageTimes"},
}


def test_submodules_are_attributes_of_a_freshly_imported_package(tmp_path):
    code = ("import dni, dni.pipeline\n"
            "print(dni.reference.reference_step.__module__, dni.pipeline.split.__name__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["dni.reference", "dni.pipeline.split"]


@pytest.mark.parametrize("package", sorted(PUBLIC_HOMES))
def test_every_public_name_is_its_modules_object(package):
    import importlib

    module = importlib.import_module(package)
    homes = {name: f"{package}.{sub}" for sub, names in PUBLIC_HOMES[package].items()
             for name in names.split()}
    defined_here = {"INTERFACE_MODES"} if package == "dni.pipeline" else set()
    assert sorted(module.__all__) == sorted({*homes, *defined_here})
    star = {}
    exec(f"from {package} import *", star)  # noqa: S102 (what is tested)
    for name, home in homes.items():
        assert getattr(module, name) is getattr(importlib.import_module(home), name) is star[name]
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        module.NoSuchName  # noqa: B018


@pytest.mark.parametrize("script, argv, exit_code, says", [
    ("main.py", ["--help"], 0, "--synth-lr"),
    ("main.py", ["--epochs", "0"], 2, "error: argument --epochs"),
    ("main.py", ["--interfaces", "edges"], 2, "error: --interfaces edges needs torchrun"),
    ("main.py", ["--message-dtype", "float16"], 2, "error: argument --message-dtype"),
    ("main.py", ["--resume", "{tmp}/nowhere"], 2, "error: --resume"),
    ("mlp.py", ["--width", "-3"], 2, "error: argument --width"),
    ("cnn.py", ["--help"], 0, "--channels"),
    ("lm.py", ["--help"], 0, "--truncation"),
    ("lm.py", ["--resume", "{tmp}/nowhere"], 2, "error: --resume"),
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
