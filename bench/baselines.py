"""Backprop baselines on full MNIST: test accuracy per epoch, samples/s, and where the time
goes (data path vs compute), printed as a table.

Usage: python bench/baselines.py [--mlp-epochs 20] [--cnn-epochs 10] [--train-size N]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from experiment.baseline import BASELINE_DEFAULTS, train_backprop
from experiment.cli import Parser, nonnegative_int, positive_int, resolve_device, run
from experiment.data import load_mnist


def run_baseline(model_type: str, epochs: int, data, out: Path) -> dict:
    """Train one baseline with the scripts' defaults; return its summary."""
    _, batch_size, lr = BASELINE_DEFAULTS[model_type]
    args = argparse.Namespace(epochs=epochs, batch_size=batch_size, lr=lr, seed=0, log_every=0,
                              train_size=len(data.train_x),
                              depth=3, width=256, channels=[32, 64])
    torch.manual_seed(0)
    return train_backprop(model_type, args, data, out, script="bench/baselines.py")


def main() -> None:
    """Run both baselines and print the table."""
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlp-epochs", type=nonnegative_int, default=20,
                        help="epochs of the MLP baseline (0: skip it)")
    parser.add_argument("--cnn-epochs", type=nonnegative_int, default=10,
                        help="epochs of the CNN baseline (0: skip it)")
    parser.add_argument("--train-size", type=positive_int, default=None,
                        help="first N training examples only (default: all 60000)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when available, else CPU")
    args = parser.parse_args()
    device = resolve_device(args.device)
    data = load_mnist(ROOT / "data", device, args.train_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_type, epochs in (("mlp", args.mlp_epochs), ("cnn", args.cnn_epochs)):
            if epochs > 0:
                rows.append(run_baseline(model_type, epochs, data, Path(tmp)))
    print(f"\nhardware: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}, torch {torch.__version__}")
    print("| model | epochs | test acc | samples/s | train s | data path % | acc by epoch |")
    print("|---|---|---|---|---|---|---|")
    for s in rows:
        by_epoch = " ".join(f"{100 * h['test_acc']:.2f}" for h in s["history"])
        print(f"| {s['model']} | {s['epochs']} | {100 * s['test_acc']:.2f}% | "
              f"{s['samples_per_s']:.0f} | {s['train_seconds']:.1f} | "
              f"{100 * s['data_seconds'] / s['train_seconds']:.1f}% | "
              f"{by_epoch} |")


if __name__ == "__main__":
    run(main)
