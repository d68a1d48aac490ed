"""Checks that a training step captured as a CUDA graph (experiment.graphed) trains exactly as
the same step run eagerly, and times both, for the runs of bench/paper_budget.py: two copies of
each run from one seed, one replaying its captured step, one eager, on the same batches.

Usage: python bench/graph_check.py [--layers 3 4] [--methods dni cdni bp] [--steps 20]
       [--timed 200]
Prints, per run, the largest parameter difference between the two copies (relative to the
parameter's largest value) after --steps steps, the second half at a tenth of the learning
rate (a changed rate must reach the captured step), and each copy's milliseconds per step;
exits 1 when a difference is over --tolerance. The captured copy went through the capture's
warm-up steps and was put back, so a faulty put-back shows as a difference too. Without a GPU
both copies run eagerly (a check of the script only).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from bench.paper_budget import add_run_arguments, build_run
from experiment.cli import Parser, positive_float, positive_int, resolve_device, run
from experiment.data import load_mnist
from experiment.graphed import GraphedTrainer


def relative_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """The largest |a - b| over the floating-point entries of two models' states, each
    relative to the largest |b| of its tensor."""
    worst = 0.0
    sb = b.state_dict()
    for name, value in a.state_dict().items():
        if value.is_floating_point():
            scale = sb[name].abs().max().clamp_min(1e-12)
            worst = max(worst, ((value - sb[name]).abs().max() / scale).item())
    return worst


def milliseconds_per_step(trainer: GraphedTrainer, order: torch.Tensor, steps: int) -> float:
    """Mean milliseconds of a step over `steps` steps (new epochs started as needed, untimed)."""
    count = steps
    total = 0.0
    while steps > 0:
        trainer.start_epoch(order)
        chunk = min(steps, trainer.steps_per_epoch)
        if trainer.stream is not None:
            trainer.stream.synchronize()
        begin = time.perf_counter()
        for _ in range(chunk):
            trainer.step()
        if trainer.stream is not None:
            trainer.stream.synchronize()
        total += time.perf_counter() - begin
        steps -= chunk
    return 1000 * total / count


def main() -> None:
    """Compare and time the graph and eager copies of each run."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--steps", type=positive_int, default=20,
                        help="steps of both copies before they are compared")
    parser.add_argument("--timed", type=positive_int, default=200,
                        help="steps timed for each copy after the comparison")
    parser.add_argument("--tolerance", type=positive_float, default=1e-4,
                        help="the largest relative difference that passes")
    args = parser.parse_args()
    device = resolve_device(args.device)
    data = load_mnist(ROOT / "data", device, args.train_size)
    scratch = Path("/tmp") / "graph_check"   # build_run names folders; nothing is written
    failed = False
    print(f"{'run':<10} {'difference':>10} {'eager ms':>9} {'graph ms':>9} {'speed-up':>8}")
    for layers in args.layers:
        for method in args.methods:
            graphed = build_run(method, layers, data, 0, scratch)
            eager = build_run(method, layers, data, 0, scratch)
            graphed.trainer.capture()
            order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(1))
            steps = min(args.steps, graphed.trainer.steps_per_epoch)
            for trainer in (graphed.trainer, eager.trainer):
                trainer.start_epoch(order)
                for step in range(steps):   # the second half at a tenth of the rate
                    trainer.set_rate_factor(1.0 if step < steps // 2 else 0.1)
                    trainer.step()
                if trainer.stream is not None:
                    trainer.stream.synchronize()
            difference = relative_difference(graphed.model, eager.model)
            failed |= not difference <= args.tolerance
            eager_ms = milliseconds_per_step(eager.trainer, order, args.timed)
            graph_ms = milliseconds_per_step(graphed.trainer, order, args.timed)
            print(f"{graphed.name:<10} {difference:>10.2e} {eager_ms:>9.3f} {graph_ms:>9.3f} "
                  f"{eager_ms / graph_ms:>7.1f}x", flush=True)
    if failed:
        print(f"FAIL: a graph step differs from the eager one by more than {args.tolerance}")
        sys.exit(1)
    print("graph steps train as eager steps" if device.type == "cuda"
          else "no GPU: both copies ran eagerly (a check of the script only)")


if __name__ == "__main__":
    run(main)
