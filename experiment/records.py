"""Run records shared by every training script: config.json (flags, versions, device, git
commit), metrics.csv (one row per logged step and per epoch), atomic checkpoints, and the
reading of a run folder for --resume. torch loads where a checkpoint is read or written, so that
reading a run's flags does not wait for it."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiment.errors import UserError

if TYPE_CHECKING:
    import torch

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "dni-run-checkpoint/1"
BASE_COLUMNS = ["kind", "step", "epoch", "wall_seconds", "train_loss", "test_loss", "test_acc"]


def world_size_from_env() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory in MiB: the GPU's allocations on CUDA, else the process's
    peak resident set (torch itself included)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def write_text_whole(path: Path, text: str) -> None:
    """Write `text` atomically (temporary file, then rename), line endings as given;
    processes writing the same file at once each use their own temporary file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with written_whole(tmp, path):
        tmp.write_text(text, newline="")
        os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (`write_text_whole`)."""
    write_text_whole(path, json.dumps(obj, indent=2) + "\n")


@contextmanager
def written_whole(tmp: Path, path: Path) -> Iterator[None]:
    """Around writing `tmp` and renaming it to `path`: on any failure (a full disk, a second
    Ctrl-C) the temporary file goes, `path` keeps its last whole version, and an OSError
    becomes a UserError that names `path`."""
    try:
        yield
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {path}: {exc.strerror or exc}; its last whole "
                            "version (if any) stays") from None
        raise


def git_commit() -> str | None:
    """The commit of the code being run, when it lives in a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_config(out_dir: Path, script: str, args: argparse.Namespace,
                 device: torch.device) -> None:
    """config.json: every flag, library versions, device and git commit."""
    import numpy
    import torch

    write_json(out_dir / "config.json", {
        "script": script, "argv": sys.argv, "args": vars(args), "device": str(device),
        "world_size": world_size_from_env(),
        "git_commit": git_commit(), "python": platform.python_version(),
        "torch": torch.__version__, "numpy": numpy.__version__, "platform": platform.platform(),
    })


def read_config(run_dir: Path) -> dict:
    """A run folder's config.json: the script that made it and its flags (`args`)."""
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such folder")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--resume {run_dir}: no config.json there (not a run folder)") from None
    except (OSError, ValueError):
        raise UserError(f"--resume {run_dir}: {path.name} is unreadable or cut off") from None
    if not isinstance(config, dict) or not isinstance(config.get("args"), dict):
        raise UserError(f"--resume {run_dir}: {path.name} is not a run's config")
    return config


class MetricsLog:
    """metrics.csv: step rows (kind=step) and epoch rows (kind=epoch) under one header."""

    def __init__(self, path: Path, metric_columns: list[str], keep_rows: int | None = None):
        self.path = path
        self.columns = BASE_COLUMNS + metric_columns
        self.rows = 0
        if keep_rows is None or not path.exists():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        else:  # resuming: drop rows written after the checkpoint, in one rename (a signal
            # that kills the run while it resumes must not cut the records short)
            with open(path, newline="") as f:
                lines = list(csv.reader(f))[:keep_rows + 1]
            kept = io.StringIO()
            csv.writer(kept).writerows(lines)
            write_text_whole(path, kept.getvalue())
            self.rows = len(lines) - 1

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (missing columns stay empty) and flush it to disk."""
        values = ["" if row.get(c) is None else row[c] for c in self.columns]
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(values)
        self.rows += 1


def save_checkpoint(out_dir: Path, payload: dict, name: str = CHECKPOINT) -> Path:
    """Write the checkpoint (checkpoint.pt by default) atomically: temporary file, rename."""
    import torch

    path = out_dir / name
    tmp = out_dir / f".{name}.tmp"
    buffer = io.BytesIO()  # serialised first: a failed file write is then a plain OSError
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, buffer)
    with written_whole(tmp, path):
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path, device: torch.device, name: str = CHECKPOINT) -> dict:
    """Read a checkpoint (checkpoint.pt by default); a missing, truncated or foreign file is a
    UserError."""
    import torch

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
