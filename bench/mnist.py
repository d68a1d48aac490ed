"""Backprop vs DNI vs cDNI on full MNIST, MLP and CNN: test accuracy per epoch, samples/s, and the
cost of a training step relative to backprop, measured side by side in the same process.

Usage: python bench/mnist.py [--models mlp cnn] [--methods bp dni cdni] [--epochs 20]
       [--cnn-epochs N] [--train-size N] [--results DIR] [--steps-only]
Each accuracy run is the real script (mlp.py / cnn.py / main.py) with the settings in SETTINGS,
in its own folder under --results: finished runs are read back, interrupted ones resumed.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F

from bench.script_runs import script_runs
from experiment.cli import Parser, positive_int, run
from experiment.networks import attach_dni, dni_defaults
from model import CNN, FCN

# the flags each (model, method) runs with; see bench/README.md for how they were chosen
SETTINGS = {
    ("mlp", "bp"): ["mlp.py"],
    ("mlp", "dni"): ["main.py", "--model_type", "mlp"],
    ("mlp", "cdni"): ["main.py", "--model_type", "mlp", "--conditioned", "True"],
    ("cnn", "bp"): ["cnn.py"],
    ("cnn", "dni"): ["main.py", "--model_type", "cnn"],
    ("cnn", "cdni"): ["main.py", "--model_type", "cnn", "--conditioned", "True"],
}


def accuracy_run(model: str, method: str, epochs: int, train_size: int | None, out: Path
                 ) -> dict:
    """Run the script for (model, method) in `out` and return its summary; a finished run is
    read back, an interrupted one resumed from its checkpoint."""
    command = [*SETTINGS[(model, method)], "--epochs", str(epochs)]
    return script_runs([(command + (["--train-size", str(train_size)] if train_size else []),
                         out)])[0]


def step_costs(model: str, repeats: int = 30, steps: int = 10) -> dict[str, float]:
    """Median seconds per training step of bp, DNI and cDNI with main.py's default batch and
    synthesizers, interleaved so machine noise hits all alike."""
    defaults = dni_defaults(model, conditioned=False)
    batch_size, synthesizer = defaults["batch_size"], defaults["synthesizer"]
    options = {"num_layers": defaults["synth_layers"]} if defaults["synth_layers"] else {}
    torch.manual_seed(0)
    x = torch.randn(batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (batch_size,))

    def build(method):
        net = CNN() if model == "cnn" else FCN()
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        if method == "bp":
            return net, opt, {}
        wrapped = attach_dni(net, opt, x[:2], synthesizer=synthesizer,
                             conditioned=method == "cdni", **options)
        return wrapped, opt, ({"context": y} if method == "cdni" else {})

    arms = {method: build(method) for method in ("bp", "dni", "cdni")}
    times: dict[str, list[float]] = {method: [] for method in arms}
    for _ in range(repeats):
        for method, (net, opt, kwargs) in arms.items():
            start = time.perf_counter()
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x, **kwargs), y).backward()
                opt.step()
            times[method].append((time.perf_counter() - start) / steps)
    return {method: statistics.median(t) for method, t in times.items()}


def main() -> None:
    """Run the accuracy table and the step-cost table."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["mlp", "cnn"], default=["mlp", "cnn"],
                        help="networks")
    parser.add_argument("--methods", nargs="+", choices=["bp", "dni", "cdni"],
                        default=["bp", "dni", "cdni"], help="training methods")
    parser.add_argument("--epochs", type=positive_int, default=20, help="epochs of every run")
    parser.add_argument("--cnn-epochs", type=positive_int, default=None,
                        help="epochs of the CNN runs (default: as --epochs)")
    parser.add_argument("--train-size", type=positive_int, default=None,
                        help="first N training examples only (default: all 60000)")
    parser.add_argument("--results", type=Path, default=ROOT / "runs" / "bench-mnist",
                        help="folder of the run folders, kept between invocations")
    parser.add_argument("--steps-only", action="store_true", help="only the step-cost table")
    args = parser.parse_args()
    print(f"hardware: {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    rows = []
    if not args.steps_only:
        for model in args.models:
            epochs = args.cnn_epochs if model == "cnn" and args.cnn_epochs else args.epochs
            for method in args.methods:
                size = f"-n{args.train_size}" if args.train_size else ""
                out = args.results / f"{model}-{method}-e{epochs}{size}"
                rows.append(accuracy_run(model, method, epochs, args.train_size, out))
    print("\n| model | method | epochs | test acc | best epoch acc | samples/s | acc by epoch |")
    print("|---|---|---|---|---|---|---|")
    for s in rows:
        accs = [h["test_acc"] for h in s["history"]]
        print(f"| {s['model']} | {s['method']} | {s['epochs']} | {100 * s['test_acc']:.2f}% | "
              f"{100 * max(accs):.2f}% | {s['samples_per_s']:.0f} | "
              f"{' '.join(f'{100 * a:.1f}' for a in accs)} |")
    print("\n| model | batch | bp ms/step | DNI ms/step | cDNI ms/step | DNI / bp | cDNI / bp |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        cost = step_costs(model)
        print(f"| {model} | {dni_defaults(model, False)['batch_size']} | {1000 * cost['bp']:.2f} | {1000 * cost['dni']:.2f} | "
              f"{1000 * cost['cdni']:.2f} | {cost['dni'] / cost['bp']:.2f}x | "
              f"{cost['cdni'] / cost['bp']:.2f}x |", flush=True)


if __name__ == "__main__":
    run(main)
