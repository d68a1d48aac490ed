"""The installed package: its public names import from outside the repository."""

import subprocess
import sys

PUBLIC = "DNI, DNI_Network, Linear_DNI, Linear_Sigmoid_DNI, RNN_DNI"


def test_public_names_import_from_outside_the_repo(tmp_path):
    code = f"from dni import {PUBLIC}; import dni; print(dni.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("__init__.py")
