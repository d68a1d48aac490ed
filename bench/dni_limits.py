"""What limits unconditioned DNI, per interface and over time: the synthetic gradient's cosine
to the true one, its norm ratio to it, and how far the lowest block's weights have moved from
their start (relative to their initial norm; backprop's movement alongside), on MNIST with a
user's loop (Adam at 1e-3, constant, batch 128).

Usage: OMP_NUM_THREADS=1 python bench/dni_limits.py [--network fcn|residual|layernorm_dropout]
       [--methods bp dni dni_uncentred] [--epochs 20] [--measure-every 50]
One line per method and epoch: test accuracy, then per interface (1 the lowest) the epoch's
mean cosine and norm ratio ||g|| / ||dL/dh|| (measured every --measure-every steps by an extra
backward that leaves training untouched), and the lowest block's relative movement.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F

from bench.generality import BATCH, LR, METHODS, NETWORKS
from dni import DNI
from experiment.cli import Parser, positive_int, run
from experiment.data import batch_order, batches, load_mnist
from experiment.train import evaluate
from model import FCN

NETWORK_CHOICES = ("fcn", *NETWORKS)


def relative_movement(block: torch.nn.Module, start: list[torch.Tensor]) -> float:
    """||theta - theta_0|| / ||theta_0|| over a block's parameters."""
    moved = sum((p.detach() - p0).pow(2).sum() for p, p0 in zip(block.parameters(), start))
    return math.sqrt(moved / sum(p0.pow(2).sum() for p0 in start))


def trace(network: str, method: str, data, epochs: int, every: int, seed: int = 0):
    """Yield (epoch, accuracy, cosines, norm ratios, lowest block's movement) per epoch."""
    torch.manual_seed(seed)
    net = FCN() if network == "fcn" else NETWORKS[network](784, 10)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    options = METHODS[method]
    model = net if options is None else DNI(net, optim=optimizer, example_input=data.train_x[:2],
                                           **options)
    lowest = next(iter(net.children()))
    start = [p.detach().clone() for p in lowest.parameters()]
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(1, epochs + 1):
        model.train()
        cosines, ratios = [], []
        order = batch_order(len(data.train_x), generator, data.train_x.device)
        for x, y in batches(data.train_x, data.train_y, BATCH, order):
            if options is not None and step % every == 0:
                pairs = model.synthetic_and_true_gradients(F.cross_entropy, x, y)
                cosines.append([F.cosine_similarity(g.flatten(), t.flatten(), dim=0).item()
                                for g, t in pairs])
                ratios.append([(g.norm() / t.norm().clamp_min(1e-30)).item() for g, t in pairs])
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            step += 1
        mean = (lambda rows: torch.tensor(rows).mean(0).tolist() if rows else [])
        yield (epoch, evaluate(model, data.test_x, data.test_y)[1], mean(cosines), mean(ratios),
               relative_movement(lowest, start))


def main() -> None:
    """Trace each method in turn and print its lines."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", choices=NETWORK_CHOICES, default="fcn",
                        help="fcn: main.py's MLP; the others: bench/generality.py's")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS),
                        default=["bp", "dni", "dni_uncentred"], help="methods, in turn")
    parser.add_argument("--epochs", type=positive_int, default=20, help="epochs per method")
    parser.add_argument("--measure-every", type=positive_int, default=50,
                        help="steps between measurements of the true gradient")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args()
    data = load_mnist(ROOT / "data")
    print(f"{args.network}, Adam {LR}, batch {BATCH}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    for method in args.methods:
        start = time.perf_counter()
        for epoch, accuracy, cosines, ratios, moved in trace(
                args.network, method, data, args.epochs, args.measure_every, args.seed):
            figures = "".join(f"  cos{i} {c:+.3f} ratio{i} {r:.2f}"
                              for i, (c, r) in enumerate(zip(cosines, ratios), 1))
            print(f"{method:>14} epoch {epoch:2d}  acc {accuracy:.2%}{figures}  moved1 "
                  f"{moved:.3f}  {time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    run(main)
