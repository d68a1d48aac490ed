"""What limits unconditioned DNI, per interface and over time: the synthetic gradient's cosine
to the true one, its norm ratio to it, and how far the lowest block's weights have moved from
their start (relative to their initial norm; backprop's movement alongside), on MNIST with a
user's loop (Adam at 1e-3, constant, batch 128); and variants of DNI tried against them.

Usage: OMP_NUM_THREADS=1 python bench/probes/dni_limits.py
       [--network fcn|residual|layernorm_dropout|layernorm] [--dataset mnist|digits] [--methods bp dni dni_uncentred] [--epochs 20]
       [--measure-every 50] [--seeds 0]
One line per method and epoch: test accuracy, then per interface (1 the lowest) the epoch's
mean cosine and norm ratio ||g|| / ||dL/dh|| (measured every --measure-every steps by an extra
backward that leaves training untouched), and the lowest block's relative movement.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F
from torch import nn

from bench.generality import BATCH, DATASETS, LR, METHODS, NETWORKS
from dni import DNI, Interface, LinearSynthesizer, Synthesizer, synthesizer_loss
from dni.interface import _Bridge
from dni.synthesizers import zero_init_
from experiment.cli import Parser, positive_int, run
from experiment.data import batch_order, batches
from experiment.train import evaluate
from model import FCN

NETWORK_CHOICES = ("fcn", *NETWORKS, "layernorm")


class HeadShapedSynthesizer(Synthesizer):
    """For the interface just below a linear softmax head W, b: S(h) = W^T (softmax(W h + b)
    - q(h)), q = softmax(W h + b + V h + c) with V, c learned (zero at the start, so S starts
    at zero); W and b are read from the head, not trained through S."""

    def __init__(self, size: int, head: nn.Linear):
        super().__init__(size)
        self.head = [head]               # in a list: not a submodule, its parameters not S's
        self.correction = zero_init_(nn.Linear(size, head.out_features))

    def forward(self, input, hidden=None, context=None):
        """Return (W^T (p - q), None)."""
        head = self.head[0]
        logits = F.linear(input, head.weight.detach(), head.bias.detach())
        q = torch.softmax(logits + self.correction(input), 1)
        return (torch.softmax(logits, 1) - q) @ head.weight.detach(), None


def head_shaped_at_top(net: nn.Module):
    """A factory: linear synthesizers, a head-shaped one at the top interface."""
    built, interfaces = [], len(list(net.children())) - 1

    def build(shape: tuple, context_size: int) -> nn.Module:
        built.append(shape)
        if len(built) == interfaces:
            return HeadShapedSynthesizer(shape[0], list(net.children())[-1])
        return LinearSynthesizer(shape[0])
    return build


class SlowCopyInterface(Interface):
    """An interface that sends its block (and, through it, the target of the interface below)
    the synthetic gradient of `slow`, a copy of its synthesizer whose parameters follow the
    synthesizer's by an exponential moving average; the synthesizer itself is still the one
    fit on the target (the recurrent case's slow target copy, bench/README.md)."""

    slow: nn.Module

    def forward(self, h, context=None, net_input=None):
        """Send slow(h) into h's block; fit the synthesizer on what comes back from above."""
        synthetic = self.predict(h, context)
        with torch.no_grad():
            sent = self.slow(h.detach(), None)
            sent = sent[0] if isinstance(sent, tuple) else sent
            if self.center:
                sent = sent - sent.mean(0, keepdim=True)
        unit = self.unit(h)
        self.send_gradient(h, sent)
        fitted = synthetic.detach() * (self.grad_scale / unit)  # the residual is S's, not slow's
        return _Bridge.apply(h.detach(), synthetic, fitted, self, unit)


def use_slow_copies(model: DNI) -> None:
    """Turn every interface of `model` into a SlowCopyInterface, its copy starting equal."""
    for interface in model.interfaces:
        interface.__class__ = SlowCopyInterface
        interface.slow = copy.deepcopy(interface.synthesizer).requires_grad_(False)


def follow_synthesizers(model: DNI, decay: float) -> None:
    """slow <- decay * slow + (1 - decay) * synthesizer, for every interface."""
    with torch.no_grad():
        for interface in model.interfaces:
            for slow, fast in zip(interface.slow.parameters(),
                                  interface.synthesizer.parameters()):
                slow.lerp_(fast, 1 - decay)


def backprop_step(model: DNI, x: torch.Tensor, y: torch.Tensor) -> None:
    """A warm-start step: the blocks get the true gradient (backprop) and every synthesizer is
    fit on the true gradient at its interface; nothing is synthetic."""
    hs: list[torch.Tensor] = []      # each block's output, in call order like the interfaces
    handles = [model.net.get_submodule(name).register_forward_hook(
        lambda module, args, output: hs.append(output)) for name in model.block_names]
    try:      # the inner network on its own: DNI's hooks pass outside DNI's forward
        loss = F.cross_entropy(model.net(x), y)
    finally:
        for handle in handles:
            handle.remove()
    true = torch.autograd.grad(loss, hs, retain_graph=True)
    loss.backward()
    for interface, h, gradient in zip(model.interfaces, hs, true):
        synthesizer_loss(interface.predict(h), interface.unit(h) * gradient).backward()


# variants of unconditioned DNI beyond bench/generality.py's METHODS: DNI options, a
# "coupled" flag for block learning rates scaled by each synthesizer's measured fit, slow
# synthesizer copies (their decay), warm starts (steps of backprop before DNI), and
# synthesizers that also see the network input
VARIANTS: dict[str, dict] = {
    "centre_all": {"centre_all": True},
    "synth_lr_1e-4": {"synthesizer_lr": 1e-4},
    "synth_lr_3e-4": {"synthesizer_lr": 3e-4},
    "head_top": {"head_top": True},
    "coupled_lr": {"coupled": True},
    "coupled_lr_uncentred": {"coupled": True, "center_gradients": False},
    "slow_copy_0.5": {"slow_copy": 0.5},
    "slow_copy_0.9": {"slow_copy": 0.9},
    "warm_start_24": {"warm_start": 24},
    "warm_start_120": {"warm_start": 120},
    "sees_input": {"sees_input": True},
}
COUPLING_DECAY = 0.9


def fit_on_target(interface) -> float:
    """<g, d> / <g, g> for the last step's synthetic gradient g and its target d: the scale
    that would have fit g best to a target it had not yet seen (0: no better than nothing)."""
    target, synthetic = interface.last_target, interface.last_synthetic
    return ((synthetic * target).sum() / (synthetic * synthetic).sum().clamp_min(1e-30)).item()


def relative_movement(block: torch.nn.Module, start: list[torch.Tensor]) -> float:
    """||theta - theta_0|| / ||theta_0|| over a block's parameters."""
    moved = sum((p.detach() - p0).pow(2).sum() for p, p0 in zip(block.parameters(), start))
    return math.sqrt(moved / sum(p0.pow(2).sum() for p0 in start))


def column_means(rows: list[list[float]]) -> list[float]:
    """The mean of each column of equal-length rows ([] for no rows)."""
    return torch.tensor(rows).mean(0).tolist() if rows else []


def trace(network: str, method: str, data, epochs: int, every: int, seed: int = 0):
    """Yield (epoch, accuracy, cosines, norm ratios, lowest block's movement) per epoch."""
    torch.manual_seed(seed)
    size, classes = math.prod(data.train_x.shape[1:]), data.num_classes
    if network == "fcn":
        net = FCN(in_features=size, num_classes=classes)
    elif network == "layernorm":       # layernorm_dropout without its dropout
        net = NETWORKS["layernorm_dropout"](size, classes, dropout=0.0)
    else:
        net = NETWORKS[network](size, classes)
    blocks = list(net.children())
    optimizer = torch.optim.Adam([{"params": list(b.parameters())} for b in blocks], lr=LR)
    spec = METHODS[method] if method in METHODS else VARIANTS[method]
    options = dict(spec or {})
    centre_all, coupled = options.pop("centre_all", False), options.pop("coupled", False)
    slow_decay, warm_steps = options.pop("slow_copy", None), options.pop("warm_start", 0)
    sees_input = options.pop("sees_input", False)
    if sees_input:      # every synthesizer also sees the flattened network input, as context
        options["context_size"] = size
    conditioned = options.get("context_size", 0) > 0
    if options.pop("head_top", False):
        options["synthesizer"] = head_shaped_at_top(net)
    model = net if spec is None else DNI(
        net, optim=optimizer, example_input=data.train_x[:2], **options)
    if centre_all:
        for interface in model.interfaces:
            interface.center = True
    if slow_decay is not None:
        use_slow_copies(model)
    fits = [0.0] * (len(blocks) - 1)
    lowest = blocks[0]
    start = [p.detach().clone() for p in lowest.parameters()]
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(1, epochs + 1):
        model.train()
        cosines, ratios = [], []
        order = batch_order(len(data.train_x), generator, data.train_x.device)
        for x, y in batches(data.train_x, data.train_y, BATCH, order):
            context = x.flatten(1) if sees_input else y if conditioned else None
            if model is not net and step % every == 0:
                pairs = model.synthetic_and_true_gradients(F.cross_entropy, x, y, context)
                cosines.append([F.cosine_similarity(g.flatten(), t.flatten(), dim=0).item()
                                for g, t in pairs])
                ratios.append([(g.norm() / t.norm().clamp_min(1e-30)).item() for g, t in pairs])
            optimizer.zero_grad()
            if step < warm_steps:
                backprop_step(model, x, y)
            else:
                out = model(x, context=context) if conditioned else model(x)
                F.cross_entropy(out, y).backward()
            if coupled:   # block i's rate: lr times its synthesizer's running fit, in [0, 1]
                for i, interface in enumerate(model.interfaces):
                    fits[i] = COUPLING_DECAY * fits[i] + (1 - COUPLING_DECAY) * fit_on_target(
                        interface)
                    optimizer.param_groups[i]["lr"] = LR * min(1.0, max(0.0, fits[i]))
            optimizer.step()
            if slow_decay is not None:
                follow_synthesizers(model, slow_decay)
            step += 1
        yield (epoch, evaluate(model, data.test_x, data.test_y)[1], column_means(cosines),
               column_means(ratios), relative_movement(lowest, start))


def main() -> None:
    """Trace each method in turn and print its lines."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", choices=NETWORK_CHOICES, default="fcn",
                        help="fcn: main.py's MLP; layernorm: layernorm_dropout without dropout; "
                             "the others: bench/generality.py's (default: fcn)")
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, *VARIANTS],
                        default=["bp", "dni", "dni_uncentred"],
                        help="methods in turn: bench/generality.py's, or VARIANTS here "
                             "(default: bp dni dni_uncentred)")
    parser.add_argument("--epochs", type=positive_int, default=20, help="epochs per method")
    parser.add_argument("--measure-every", type=positive_int, default=50,
                        help="steps between measurements of the true gradient")
    parser.add_argument("--dataset", choices=list(DATASETS), default="mnist",
                        help="data set, as in bench/generality.py (default: mnist)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="random seeds, each run in turn (default: 0)")
    args = parser.parse_args()
    data = DATASETS[args.dataset]()
    print(f"{args.network}, {args.dataset}, Adam {LR}, batch {BATCH}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    for method in args.methods:
        for seed in args.seeds:
            start = time.perf_counter()
            for epoch, accuracy, cosines, ratios, moved in trace(
                    args.network, method, data, args.epochs, args.measure_every, seed):
                figures = "".join(f"  cos{i} {c:+.3f} ratio{i} {r:.2f}"
                                  for i, (c, r) in enumerate(zip(cosines, ratios), 1))
                print(f"{method:>14} seed {seed} epoch {epoch:2d}  acc {accuracy:.2%}{figures}  "
                      f"moved1 {moved:.3f}  {time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    run(main)
