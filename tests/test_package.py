"""The installed package: its public names import from outside the repository."""

import subprocess
import sys

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
