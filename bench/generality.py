"""The library as a new user meets it, on networks and data the project never tuned for:
backprop, `DNI(net, optim=opt)` with no other argument, and cDNI (`context_size=10`), each
also without the centring of synthetic gradients that is the default (the old defaults), on a
residual MLP and on an MLP with LayerNorm and dropout, on MNIST and on scikit-learn's 8x8
digits. The loop is a user's: Adam at 1e-3, constant, batch 128; test accuracy every epoch
(rows at 2 and at the last epoch).

Usage: python bench/generality.py [--networks ...] [--datasets ...] [--methods ...]
       [--epochs 20] [--seeds 0] [--results DIR] [--table-only]
Each cell's accuracies per epoch go to a JSON file under --results as soon as it finishes,
and finished cells are read back, so an interrupted bench loses at most the cell it was on.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F
from torch import nn

from dni import DNI
from experiment.cli import Parser, positive_int, run
from experiment.data import ImageSplits, batch_order, batches, load_digits, load_mnist
from experiment.train import evaluate

WIDTH, LR, BATCH = 256, 1e-3, 128


class Residual(nn.Module):
    """x + Linear(ReLU(Linear(x))): a residual block of the width of its input."""

    def __init__(self, width: int):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output, x plus the branch."""
        return x + self.inner(x)


def residual_mlp(input_size: int, classes: int, width: int = WIDTH, blocks: int = 3
                 ) -> nn.Sequential:
    """A flattening linear stem, `blocks` residual blocks, a ReLU'd linear head: DNI's
    default puts an interface after the stem and after every residual block."""
    stem = nn.Sequential(nn.Flatten(), nn.Linear(input_size, width))
    head = nn.Sequential(nn.ReLU(), nn.Linear(width, classes))
    return nn.Sequential(stem, *(Residual(width) for _ in range(blocks)), head)


def layernorm_dropout_mlp(input_size: int, classes: int, width: int = WIDTH, depth: int = 3,
                          dropout: float = 0.2) -> nn.Sequential:
    """`depth` blocks of Linear -> LayerNorm -> ReLU -> Dropout, then a linear head."""
    def block(size: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(size, width), nn.LayerNorm(width), nn.ReLU(),
                             nn.Dropout(dropout))
    blocks = [nn.Sequential(nn.Flatten(), *block(input_size))]
    blocks += [block(width) for _ in range(depth - 1)]
    return nn.Sequential(*blocks, nn.Linear(width, classes))


NETWORKS: dict[str, Callable[[int, int], nn.Sequential]] = {
    "residual": residual_mlp, "layernorm_dropout": layernorm_dropout_mlp}
DATASETS: dict[str, Callable[[], ImageSplits]] = {
    "mnist": lambda: load_mnist(ROOT / "data"), "digits": load_digits}
# method: DNI's arguments besides net and optim (None: backprop, no DNI)
METHODS: dict[str, dict | None] = {
    "bp": None,
    "dni": {},                         # the library's defaults, as a user meets them
    "dni_uncentred": {"center_gradients": False},    # the defaults before centring
    "cdni": {"context_size": 10},
    "cdni_uncentred": {"context_size": 10, "center_gradients": False},
    "dni_lr10x": {"synthesizer_lr": 10 * LR},         # a faster synthesizer, tried once
    "dni_above_dropout": {"cut_before_dropout": False},   # the defaults before the cut moved
}
DEFAULT_METHODS = ["bp", "dni", "dni_uncentred", "cdni", "cdni_uncentred"]
METHOD_NAMES = {"bp": "backprop", "dni": "DNI(net, optim=opt)",
                "dni_uncentred": "DNI, center_gradients=False",
                "cdni": "cDNI (context_size=10)",
                "cdni_uncentred": "cDNI, center_gradients=False",
                "dni_lr10x": "DNI, synthesizer_lr = 10 lr",
                "dni_above_dropout": "DNI, cut_before_dropout=False"}


def train_cell(network: str, data: ImageSplits, method: str, epochs: int, seed: int = 0,
               batch_size: int = BATCH, lr: float = LR) -> list[float]:
    """Test accuracy (fraction) after each epoch of one network, data set and method, trained
    as a user would: Adam at `lr`, constant, shuffled batches."""
    torch.manual_seed(seed)
    input_size = math.prod(data.train_x.shape[1:])
    net = NETWORKS[network](input_size, data.num_classes)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    options = METHODS[method]
    conditioned = options is not None and options.get("context_size", 0) > 0
    model = net if options is None else DNI(net, optim=optimizer, **options)
    generator = torch.Generator().manual_seed(seed)
    accuracies = []
    for _ in range(epochs):
        model.train()
        order = batch_order(len(data.train_x), generator, data.train_x.device)
        for x, y in batches(data.train_x, data.train_y, batch_size, order):
            optimizer.zero_grad()
            out = model(x, context=y) if conditioned else model(x)
            F.cross_entropy(out, y).backward()
            optimizer.step()
        accuracies.append(evaluate(model, data.test_x, data.test_y)[1])
    return accuracies


def cell_file(results: Path, network: str, dataset: str, method: str, seed: int) -> Path:
    """Where one cell's accuracies per epoch are kept."""
    return results / f"{dataset}-{network}-{method}-s{seed}.json"


def table(results: Path, networks, datasets, methods, seeds, epochs: int) -> list[str]:
    """Markdown rows: for each data set and network, each method's test accuracy (mean over
    the seeds found) at epoch 2 and at `epochs`, and its gap to backprop."""
    def mean_at(network, dataset, method, epoch):
        found = []
        for seed in seeds:
            path = cell_file(results, network, dataset, method, seed)
            if path.exists():
                accuracies = json.loads(path.read_text())["test_acc"]
                if len(accuracies) >= epoch:
                    found.append(accuracies[epoch - 1])
        return sum(found) / len(found) if found else None

    marks = sorted({2, epochs})
    rows = ["| data | network | method | " + " | ".join(
        f"epoch {e} (vs bp)" for e in marks) + " |", "|---|---|---|" + "---|" * len(marks)]
    for dataset in datasets:
        for network in networks:
            for method in methods:
                cells = []
                for epoch in marks:
                    value, bp = (mean_at(network, dataset, m, epoch) for m in (method, "bp"))
                    if value is None:
                        cells.append("")
                    elif method == "bp" or bp is None:
                        cells.append(f"{value:.2%}")
                    else:
                        cells.append(f"{value:.2%} ({100 * (value - bp):+.2f})")
                rows.append(f"| {dataset} | {network} | {METHOD_NAMES[method]} | "
                            + " | ".join(cells) + " |")
    return rows


def main() -> None:
    """Train the missing cells (or none with --table-only) and print the table."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", choices=list(NETWORKS), default=list(NETWORKS),
                        help="networks (default: all)")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS),
                        help="data sets (default: all)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS,
                        help=f"methods (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--epochs", type=positive_int, default=20, help="epochs per cell")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds, averaged")
    parser.add_argument("--results", type=Path, default=ROOT / "runs" / "bench-generality",
                        help="folder of the cells' JSON files (default: runs/bench-generality)")
    parser.add_argument("--table-only", action="store_true",
                        help="print the table from the cells there, train nothing")
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for dataset in args.datasets:
            data = DATASETS[dataset]()
            for network in args.networks:
                for method in args.methods:
                    for seed in args.seeds:
                        path = cell_file(args.results, network, dataset, method, seed)
                        if path.exists() and len(json.loads(path.read_text())["test_acc"]) \
                                >= args.epochs:
                            continue
                        start = time.perf_counter()
                        accuracies = train_cell(network, data, method, args.epochs, seed)
                        seconds = time.perf_counter() - start
                        path.write_text(json.dumps({"test_acc": accuracies, "seconds": seconds}))
                        print(f"{dataset} {network} {method} seed {seed}: "
                              f"{' '.join(f'{a:.4f}' for a in accuracies)}  {seconds:.0f}s",
                              flush=True)
    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"Adam {LR}, batch {BATCH}, seeds {args.seeds}")
    print("\n".join(table(args.results, args.networks, args.datasets, args.methods, args.seeds,
                          args.epochs)))


if __name__ == "__main__":
    run(main)
