"""The paper's MNIST networks as ordered lists of blocks (nn.Sequential): the FCN and a small
CNN. The same classes serve the backprop baselines and the DNI models, where an interface
sits after every hidden block (every child but the classifier head)."""

from __future__ import annotations

from torch import nn

from experiment.cli import positive_int


class FCN(nn.Sequential):
    """Fully connected MNIST net: `depth` blocks of Linear -> BatchNorm -> ReLU, then a Linear
    classifier. Usage: `FCN(depth=3, width=256)`."""

    def __init__(self, depth: int = 3, width: int = 256, in_features: int = 784,
                 num_classes: int = 10):
        blocks = []
        for i in range(depth):
            layers = [nn.Flatten()] if i == 0 else []
            layers += [nn.Linear(in_features if i == 0 else width, width),
                       nn.BatchNorm1d(width), nn.ReLU()]
            blocks.append(nn.Sequential(*layers))
        super().__init__(*blocks, nn.Linear(width, num_classes))


class CNN(nn.Sequential):
    """Convolutional MNIST net: blocks of 5x5 Conv -> BatchNorm -> ReLU -> 2x2 max-pool, then a
    Linear classifier. Usage: `CNN(channels=(32, 64))`."""

    def __init__(self, channels: tuple[int, ...] = (32, 64), num_classes: int = 10,
                 image_size: int = 28):
        blocks, in_ch, size = [], 1, image_size
        for out_ch in channels:
            blocks.append(nn.Sequential(nn.Conv2d(in_ch, out_ch, 5, padding=2),
                                        nn.BatchNorm2d(out_ch), nn.ReLU(), nn.MaxPool2d(2)))
            in_ch, size = out_ch, size // 2
        head = nn.Sequential(nn.Flatten(), nn.Linear(in_ch * size * size, num_classes))
        super().__init__(*blocks, head)


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


def build_network(model_type: str, args) -> nn.Sequential:
    """The network named by model_type with the architecture flags in args."""
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
