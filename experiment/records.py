"""Run records shared by every training script: config.json (flags, versions, device, git
commit), metrics.csv (one row per logged step and per epoch), atomic checkpoints, and the
reading of a run folder for --resume."""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from experiment.errors import UserError

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "dni-run-checkpoint/1"
BASE_COLUMNS = ["kind", "step", "epoch", "wall_seconds", "train_loss", "test_loss", "test_acc"]


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename); processes writing the same file
    at once each use their own temporary file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def git_commit() -> str | None:
    """The commit of the code being run, when it lives in a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_config(out_dir: Path, script: str, args, device: torch.device) -> None:
    """config.json: every flag, library versions, device and git commit."""
    import numpy

    write_json(out_dir / "config.json", {
        "script": script, "argv": sys.argv, "args": vars(args), "device": str(device),
        "git_commit": git_commit(), "python": platform.python_version(),
        "torch": torch.__version__, "numpy": numpy.__version__, "platform": platform.platform(),
    })


def read_config(run_dir: Path) -> dict:
    """The flags a run was started with (config.json's `args`)."""
    path = run_dir / "config.json"
    try:
        return json.loads(path.read_text())["args"]
    except FileNotFoundError:
        raise UserError(f"--resume {run_dir}: no config.json there (not a run folder)") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"--resume {run_dir}: config.json is unreadable") from None


class MetricsLog:
    """metrics.csv: step rows (kind=step) and epoch rows (kind=epoch) under one header."""

    def __init__(self, path: Path, metric_columns: list[str], keep_rows: int | None = None):
        self.path = path
        self.columns = BASE_COLUMNS + metric_columns
        self.rows = 0
        if keep_rows is None or not path.exists():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        else:  # resuming: drop rows written after the checkpoint
            with open(path, newline="") as f:
                lines = list(csv.reader(f))[:keep_rows + 1]
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows(lines)
            self.rows = len(lines) - 1

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (missing columns stay empty) and flush it to disk."""
        values = ["" if row.get(c) is None else row[c] for c in self.columns]
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(values)
        self.rows += 1


def save_checkpoint(out_dir: Path, payload: dict, name: str = CHECKPOINT) -> Path:
    """Write the checkpoint (checkpoint.pt by default) atomically: temporary file, rename."""
    path = out_dir / name
    tmp = out_dir / f".{name}.tmp"
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path, device: torch.device, name: str = CHECKPOINT) -> dict:
    """Read a checkpoint (checkpoint.pt by default); a missing, truncated or foreign file is a
    UserError."""
    path = run_dir / name
    if not path.exists():
        raise UserError(f"--resume {run_dir}: no {name} there")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # noqa: BLE001 (torch raises many kinds for a damaged file)
        raise UserError(f"{path} is truncated or not a checkpoint; it cannot be resumed") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint written by this project")
    return payload
