"""Train the MNIST MLP or CNN with Decoupled Neural Interfaces: every hidden block learns from a
synthetic gradient (DNI), optionally conditioned on the label (cDNI), never from backprop."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from experiment.cli import boolean, positive_float, positive_int, prepare_run, run, training_parser
from experiment.train import Probe, fit
from model import MODEL_TYPES, add_model_arguments, attach_dni, build_network

SYNTHESIZER_CHOICES = ("linear", "linear_sigmoid", "mlp", "conv")


def parse_args():
    """The baseline flags plus the DNI ones."""
    parser = training_parser(__doc__, epochs=20, batch_size=256, lr=1e-3)
    parser.add_argument("--model_type", "--model-type", choices=MODEL_TYPES, default="mlp",
                        help="network to train")
    parser.add_argument("--conditioned", type=boolean, nargs="?", const=True, default=False,
                        help="cDNI: synthesizers also see the one-hot label (True/False/1/0, "
                             "or the flag alone)")
    parser.add_argument("--synthesizer", choices=SYNTHESIZER_CHOICES, default=None,
                        help="synthesizer kind (default: linear for mlp, conv for cnn)")
    parser.add_argument("--synth-hidden", type=positive_int, default=None,
                        help="synthesizer hidden width or channels (default: the kind's own)")
    parser.add_argument("--synth-layers", type=positive_int, default=None,
                        help="synthesizer layers, the zero-initialised output layer included "
                             "(default: the kind's own: 1 linear, 3 mlp/conv)")
    parser.add_argument("--synth-lr", type=positive_float, default=1e-4,
                        help="Adam learning rate of the synthesizers (cosine-decayed to 0)")
    parser.add_argument("--grad-scale", type=positive_float, default=1.0,
                        help="multiplier on every synthetic gradient a block receives")
    parser.add_argument("--forward-unlock", type=boolean, nargs="?", const=True, default=False,
                        help="feed each block above an interface a synthetic input predicted "
                             "from the image (forward unlocking)")
    parser.add_argument("--log-every", type=int, default=50,
                        help="measure synthetic-gradient loss and cosine to the true gradient "
                             "every N steps (0: never)")
    add_model_arguments(parser)
    args = parser.parse_args()
    if args.synthesizer is None:
        args.synthesizer = "conv" if args.model_type == "cnn" else "linear"
    if args.synthesizer == "conv" and args.model_type != "cnn":
        parser.error("--synthesizer conv needs --model_type cnn (feature-map activations)")
    if args.log_every < 0:
        parser.error(f"--log-every must be 0 or positive, got {args.log_every}")
    return args


class InterfaceLog:
    """Per-interface synthetic-gradient loss and cosine to the true gradient, averaged over
    the logged steps of an epoch."""

    def __init__(self, conditioned: bool):
        self.conditioned = conditioned
        self.losses: list[list[float]] = []
        self.cosines: list[list[float]] = []

    def forward(self, model, x, y):
        """The training forward, with the label as context for cDNI."""
        return model(x, context=y) if self.conditioned else model(x)

    def diagnose(self, model, x, y, step):
        """Record last step's synthesizer losses and this batch's cosines."""
        if step > 0:
            self.losses.append(model.synthetic_gradient_losses())
        context = y if self.conditioned else None
        self.cosines.append(model.gradient_cosines(F.cross_entropy, x, y, context=context))

    def epoch_fields(self) -> dict[str, float]:
        """Means over the epoch's logged steps: sg_loss<i> and cos<i> per interface."""
        fields = {}
        for name, rows in (("sg_loss", self.losses), ("cos", self.cosines)):
            if rows:
                for i, column in enumerate(zip(*rows), start=1):
                    fields[f"{name}{i}"] = sum(column) / len(column)
        self.losses, self.cosines = [], []
        return fields


def main():
    """Build the DNI model and train it."""
    args = parse_args()
    device, out_dir, data = prepare_run(args, "main.py")
    net = build_network(args.model_type, args).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    options = {k: v for k, v in (("hidden_size", args.synth_hidden),
                                 ("num_layers", args.synth_layers)) if v is not None}
    model = attach_dni(net, optimizer, data.train_x[:2], synthesizer=args.synthesizer,
                       conditioned=args.conditioned, synthesizer_lr=args.synth_lr,
                       grad_scale=args.grad_scale, forward_unlock=args.forward_unlock,
                       **options)
    log = InterfaceLog(args.conditioned)
    probe = Probe(forward=log.forward, diagnose=log.diagnose, every=args.log_every,
                  epoch_fields=log.epoch_fields)
    fit(model, optimizer, data, args, script="main.py", model_name=args.model_type,
        method="cdni" if args.conditioned else "dni", out_dir=out_dir, probe=probe,
        extra_summary={"synthesizer": args.synthesizer, "synth_lr": args.synth_lr,
                       "grad_scale": args.grad_scale, "forward_unlock": args.forward_unlock,
                       "interfaces": model.block_names})


if __name__ == "__main__":
    run(main)
