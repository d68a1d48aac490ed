"""One epoch of unconditioned DNI on the MNIST MLP under variants main.py does not expose:
frozen blocks, a closed-form (ridge) linear synthesizer, a nearest-neighbour memory, low-rank and
MLP synthesizers.

Usage: OMP_NUM_THREADS=1 python bench/probes/dni_one_epoch.py [--variants NAME ...]
       [--batch-size 64]
Prints one row per variant: test accuracy after one epoch and each interface's cosine between
synthetic and true gradient, averaged over the last third of the epoch (measured every 100 steps).
It asks where unconditioned DNI's gain over frozen hidden blocks comes from (bench/README.md,
"What limits unconditioned DNI").
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F
from torch import nn

from dni import DNI, LinearSynthesizer, Synthesizer
from dni.synthesizers import MLPSynthesizer
from experiment.cli import Parser, positive_int, run
from experiment.data import batch_order, batches, load_mnist
from experiment.train import evaluate, learning_rate_schedule
from model import FCN


class RidgeSynthesizer(Synthesizer):
    """Linear synthesizer solved in closed form after every step: the ridge regression of the
    targets on [h, 1] under exponentially decayed statistics (memory about 1 / (1 - decay)
    batches), instead of gradient steps."""

    def __init__(self, size: int, decay: float, ridge: float = 1e-3):
        super().__init__(size)
        self.decay, self.ridge = decay, ridge
        self.register_buffer("weight", torch.zeros(size, size + 1))
        self.register_buffer("inputs", torch.zeros(size + 1, size + 1))   # E[z z^T]
        self.register_buffer("cross", torch.zeros(size, size + 1))        # E[d z^T]
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the output a graph: the target arrives
        self._last: torch.Tensor | None = None

    def forward(self, input, hidden=None, context=None):
        """Return (weight [h, 1], None)."""
        self._last = torch.cat([input, torch.ones(len(input), 1, dtype=input.dtype)], dim=1)
        return self._last @ self.weight.T + self.anchor, None

    @torch.no_grad()
    def solve(self, target: torch.Tensor) -> None:
        """Fold the last batch (inputs, per-example targets) into the statistics; re-solve."""
        z, n = self._last, len(self._last)
        self.inputs.mul_(self.decay).add_(z.T @ z / n, alpha=1 - self.decay)
        self.cross.mul_(self.decay).add_(target.T @ z / n, alpha=1 - self.decay)
        eye = torch.eye(len(self.inputs), dtype=z.dtype)
        reg = self.ridge * self.inputs.diagonal().mean() + 1e-8
        factor = torch.linalg.cholesky(self.inputs + reg * eye)
        self.weight.copy_(torch.cholesky_solve(self.cross.T, factor).T)


class NearestNeighbourSynthesizer(Synthesizer):
    """Non-parametric synthesizer: the mean target of the k stored activations nearest to h,
    from a ring memory of the last `capacity` (activation, per-example target) pairs. It never
    sees a label; what it knows of one is what earlier targets near h carried."""

    def __init__(self, size: int, capacity: int = 8192, k: int = 16):
        super().__init__(size)
        self.k = k
        self.register_buffer("keys", torch.zeros(capacity, size))
        self.register_buffer("values", torch.zeros(capacity, size))
        self.filled, self.next = 0, 0
        self.anchor = nn.Parameter(torch.zeros(()))
        self._last: torch.Tensor | None = None

    def forward(self, input, hidden=None, context=None):
        """Return (mean target of the k nearest stored activations, None)."""
        self._last = input.detach()
        if self.filled < self.k:
            return torch.zeros_like(input) + self.anchor, None
        keys = self.keys[:self.filled]
        distance = keys.pow(2).sum(1) - 2 * input @ keys.T
        nearest = distance.topk(self.k, dim=1, largest=False).indices
        return self.values[nearest].mean(1) + self.anchor, None

    @torch.no_grad()
    def solve(self, target: torch.Tensor) -> None:
        """Store the last batch's activations with their per-example targets."""
        rows = torch.arange(self.next, self.next + len(target)) % len(self.keys)
        self.keys[rows], self.values[rows] = self._last, target
        self.next = int(rows[-1]) + 1
        self.filled = min(self.filled + len(target), len(self.keys))


class NoiseSynthesizer(Synthesizer):
    """A control, not a synthesizer: Gaussian noise of a fixed size in place of a gradient,
    to tell a learned signal from a mere perturbation of the blocks below."""

    def __init__(self, size: int, std: float = 0.01):
        super().__init__(size)
        self.std = std
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input, hidden=None, context=None):
        """Return (noise of input's shape, None)."""
        return torch.randn_like(input) * self.std + self.anchor, None


class BelowAndTop:
    """Builds, in interface order, `below(size)` for interfaces 1 and 2 and `top(size)` for
    interface 3 (the top one)."""

    def __init__(self, below, top):
        self.below, self.top, self.built = below, top, 0

    def __call__(self, size: int) -> nn.Module:
        self.built += 1
        return self.below(size) if self.built % 3 else self.top(size)


# name: (synthesizer factory or kind, per-block lr multipliers, synthesizer lr, network lr)
VARIANTS = {
    "linear": ("linear", (1, 1, 1), 1e-2, 1e-3),
    "frozen hidden blocks": ("linear", (0, 0, 0), 1e-2, 1e-3),
    "only block 3 learns": ("linear", (0, 0, 1), 1e-2, 1e-3),
    "noise into blocks 1 and 2": (BelowAndTop(NoiseSynthesizer, LinearSynthesizer), (1, 1, 1),
                                  1e-2, 1e-3),
    "noise into all blocks": (NoiseSynthesizer, (1, 1, 1), 1e-2, 1e-3),
    "linear, synth lr 3e-2": ("linear", (1, 1, 1), 3e-2, 1e-3),
    "linear, lr 2e-3": ("linear", (1, 1, 1), 1e-2, 2e-3),
    "linear, lr 3e-3": ("linear", (1, 1, 1), 1e-2, 3e-3),
    "ridge, decay 0.9": (lambda n: RidgeSynthesizer(n, 0.9), (1, 1, 1), 1e-2, 1e-3),
    "ridge, decay 0.99": (lambda n: RidgeSynthesizer(n, 0.99), (1, 1, 1), 1e-2, 1e-3),
    "ridge, decay 0.999": (lambda n: RidgeSynthesizer(n, 0.999), (1, 1, 1), 1e-2, 1e-3),
    "low rank 16": (lambda n: LinearSynthesizer(n, hidden_size=16, num_layers=2), (1, 1, 1), 1e-2, 1e-3),
    "low rank 64": (lambda n: LinearSynthesizer(n, hidden_size=64, num_layers=2), (1, 1, 1), 1e-2, 1e-3),
    "nearest 16 of 8192": (lambda n: NearestNeighbourSynthesizer(n), (1, 1, 1), 1e-2, 1e-3),
    "nearest 4 of 8192": (lambda n: NearestNeighbourSynthesizer(n, k=4), (1, 1, 1), 1e-2, 1e-3),
    "nearest 1 of 8192": (lambda n: NearestNeighbourSynthesizer(n, k=1), (1, 1, 1), 1e-2, 1e-3),
    "nearest 16 at the top, linear below": (
        BelowAndTop(LinearSynthesizer, NearestNeighbourSynthesizer), (1, 1, 1), 1e-2, 1e-3),
    "nearest 16 at the top, blocks 1-2 frozen": (
        BelowAndTop(LinearSynthesizer, NearestNeighbourSynthesizer), (0, 0, 1), 1e-2, 1e-3),
    "mlp 1x1024, synth lr 1e-2": (lambda n: MLPSynthesizer(n, hidden_size=1024, num_layers=2),
                                  (1, 1, 1), 1e-2, 1e-3),
    "mlp 1x1024, synth lr 1e-3": (lambda n: MLPSynthesizer(n, hidden_size=1024, num_layers=2),
                                  (1, 1, 1), 1e-3, 1e-3),
}


def run_variant(name: str, data, batch_size: int, seed: int) -> tuple[float, list[float], float]:
    """(test accuracy, mean cosine per interface over the last third, seconds) of one epoch."""
    kind, multipliers, synth_lr, lr = VARIANTS[name]
    torch.manual_seed(seed)
    net = FCN()
    groups = [{"params": list(block.parameters()), "lr": lr * m}
              for block, m in zip(net, (*multipliers, 1))]
    optimizer = torch.optim.Adam(groups, lr=lr)
    factory = kind if isinstance(kind, str) else (lambda shape, _context: kind(shape[0]))
    model = DNI(net, optim=optimizer, synthesizer=factory, example_input=data.train_x[:2],
                synthesizer_lr=synth_lr)
    steps = math.ceil(len(data.train_x) / batch_size)
    schedule = learning_rate_schedule(optimizer, steps)
    order = batch_order(len(data.train_x), torch.Generator().manual_seed(seed), torch.device("cpu"))
    cosines, start = [], time.perf_counter()
    model.train()
    for step, (x, y) in enumerate(batches(data.train_x, data.train_y, batch_size, order)):
        if step % 100 == 0:
            cosines.append(model.gradient_cosines(F.cross_entropy, x, y))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        schedule.step()
        for interface in model.interfaces:
            if isinstance(interface.synthesizer, (RidgeSynthesizer, NearestNeighbourSynthesizer)):
                interface.synthesizer.solve(interface.last_target * len(x))
    seconds = time.perf_counter() - start
    _, accuracy = evaluate(model, data.test_x, data.test_y)
    late = torch.tensor(cosines[-max(1, len(cosines) // 3):]).mean(0).tolist()
    return accuracy, late, seconds


def main() -> None:
    """Run the chosen variants one after another and print the table."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        metavar="NAME", help="variants to run, named in VARIANTS (default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="examples per mini-batch")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args()
    data = load_mnist(ROOT / "data")
    print(f"one epoch, batch {args.batch_size}, seed {args.seed}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    print("| variant | test acc | cos1 cos2 cos3 (last third) | s |")
    print("|---|---|---|---|")
    for name in args.variants:
        accuracy, cosines, seconds = run_variant(name, data, args.batch_size, args.seed)
        print(f"| {name} | {accuracy:.2%} | {' '.join(f'{c:.3f}' for c in cosines)} | "
              f"{seconds:.0f} |", flush=True)


if __name__ == "__main__":
    run(main)
