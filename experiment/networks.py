"""The scripts' side of model.py: the architecture flags, a network built from them, main.py's
tuned DNI defaults (from the search in bench/README.md) and DNI attached to a network."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from experiment.cli import positive_int

if TYPE_CHECKING:
    from torch import nn

MODEL_TYPES = ("mlp", "cnn")


def add_model_arguments(parser, model_type: str | None = None) -> None:
    """Architecture flags: FCN depth/width and CNN channels (only the relevant ones when the
    model type is fixed)."""
    if model_type in (None, "mlp"):
        parser.add_argument("--depth", type=positive_int, default=3, help="MLP: hidden blocks")
        parser.add_argument("--width", type=positive_int, default=256, help="MLP: units per hidden block")
    if model_type in (None, "cnn"):
        parser.add_argument("--channels", type=positive_int, nargs="+", default=[32, 64],
                            help="CNN: output channels of each conv block")


def build_network(model_type: str, args: argparse.Namespace) -> nn.Sequential:
    """The network named by model_type with the architecture flags in args."""
    from model import CNN, FCN

    if model_type == "mlp":
        return FCN(depth=args.depth, width=args.width)
    return CNN(channels=tuple(args.channels))


def dni_defaults(model_type: str, conditioned: bool, edges: bool = False) -> dict:
    """main.py's defaults for a network, from the search in bench/README.md: batch_size,
    synthesizer, synth_layers (None: the synthesizer kind's own) and synth_lr. A pipeline
    with edge interfaces (`edges`) trains the MLP at mlp.py's batch of 128."""
    if model_type == "cnn":
        return {"batch_size": 64, "synthesizer": "conv", "synth_layers": 1,
                "synth_lr": 1e-4 if conditioned else 1e-3}
    return {"batch_size": 128 if edges else 256, "synthesizer": "linear",
            "synth_layers": None, "synth_lr": 1e-3 if conditioned else 1e-2}


def attach_dni(net: nn.Sequential, optimizer, example_input, *, synthesizer: str = "linear",
               conditioned: bool = False, num_classes: int = 10,
               after: list[int] | None = None, **options):
    """Wrap a network from this module with an interface after every hidden block (every
    child but the classifier head), or only after the blocks numbered in `after` (1: the
    first); synthesizer parameters join `optimizer`."""
    from dni import DNI

    blocks = None if after is None else [str(i - 1) for i in after]
    return DNI(net, optim=optimizer, synthesizer=synthesizer, example_input=example_input,
               blocks=blocks, context_size=num_classes if conditioned else 0, **options)
