"""Train the MNIST MLP or CNN with Decoupled Neural Interfaces: every hidden block (or those
--interfaces-at names) learns from a synthetic gradient (DNI), optionally conditioned on the
label (cDNI), never from the loss's backprop. Under torchrun, a pipeline of stages (--stages)
that meet through synthetic gradients at their edges."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

# torch-free imports only up here: --help and a bad flag are answered before torch loads
from dni.pipeline import INTERFACE_MODES
from experiment.baseline import BASELINE_DEFAULTS
from experiment.cli import (
    PIPELINE_LINK_FLAGS,
    add_pipeline_link_arguments,
    add_switch,
    learning_rate,
    parse_training_args,
    positive_float,
    positive_int,
    prepare_run,
    rank_from_env,
    refuse_pipeline_flags,
    run,
    training_parser,
)
from experiment.networks import (
    MODEL_TYPES,
    add_model_arguments,
    attach_dni,
    build_network,
    dni_defaults,
)
from experiment.records import world_size_from_env

if TYPE_CHECKING:
    from experiment.train import Probe

SYNTHESIZER_CHOICES = ("linear", "linear_sigmoid", "mlp", "conv")
# what a resumed run keeps: its network, synthesizers, placement, data and batch order
RUN_DEFINING_FLAGS = ("model_type", "depth", "width", "channels", "conditioned", "synthesizer",
                      "synth_hidden", "synth_layers", "forward_unlock", "center_gradients",
                      "interfaces_at",
                      "interfaces", "stages", "staleness", "batch_size", "train_size", "seed")
# the flags that shape a pipeline's processes and messages, and why one process has no use for
# them: typed without torchrun (at any value, the default's included), each is an error
PIPELINE_ONLY_FLAGS = {
    "stages": "one process runs every block; --interfaces-at puts interfaces where a "
              "pipeline's stages would end",
    **PIPELINE_LINK_FLAGS,
}


def parse_args():
    """The baseline flags plus the DNI ones."""
    parser = training_parser(
        __doc__, epochs=None, batch_size=None, lr=1e-3,
        epochs_help="passes over the training set (default: mlp 20 as mlp.py, cnn 10 as cnn.py)",
        batch_size_help="examples per mini-batch (default: mlp 256, or 128 with edge interfaces "
                        "or --interfaces-at; cnn 64)",
        log_every_help="every N steps, write a metrics.csv row and measure each interface's "
                       "cosine to the true gradient (0: epoch rows only)")
    parser.add_argument("--model_type", "--model-type", choices=MODEL_TYPES, default="mlp",
                        help="network to train")
    add_switch(parser, "--conditioned", "cDNI: synthesizers also see the one-hot label")
    parser.add_argument("--synthesizer", choices=SYNTHESIZER_CHOICES, default=None,
                        help="synthesizer kind (default: linear for mlp, conv for cnn)")
    parser.add_argument("--synth-hidden", type=positive_int, default=None,
                        help="synthesizer hidden width or channels (default: the kind's own)")
    parser.add_argument("--synth-layers", type=positive_int, default=None,
                        help="synthesizer layers, the zero-initialised output layer included "
                             "(default: 1 linear and conv, 3 mlp)")
    parser.add_argument("--synth-lr", type=learning_rate, default=None,
                        help="Adam learning rate of the synthesizers (default: mlp 1e-2 for DNI, "
                             "1e-3 for cDNI; cnn 1e-3 for DNI, 1e-4 for cDNI)")
    parser.add_argument("--grad-scale", type=positive_float, default=1.0,
                        help="multiplier on every synthetic gradient a block receives")
    add_switch(parser, "--center-gradients", "subtract the batch mean from the synthetic "
               "gradient of every interface but the top one (False: the paper's DNI)",
               default=True)
    add_switch(parser, "--forward-unlock", "feed each block above an interface a synthetic "
               "input predicted from the image (forward unlocking)")
    parser.add_argument("--baseline", nargs="+", default=None, metavar="RUN_DIR",
                        help="at the end, draw this run's figures beside these runs' (e.g. an "
                             "mlp.py run's) into the run folder (default: none)")
    parser.add_argument("--interfaces-at", type=positive_int, nargs="+", default=None,
                        metavar="BLOCK",
                        help="one process: interfaces only after these blocks (1: the first), "
                             "backprop between, as --stages would (default: every hidden block)")
    parser.add_argument("--stages", type=positive_int, nargs="+", default=None, metavar="BLOCKS",
                        help="under torchrun: blocks per pipeline stage, one number per process "
                             "(default: balanced by counted operations)")
    parser.add_argument("--interfaces", choices=INTERFACE_MODES, default=None,
                        help="under torchrun: edges (default): an interface at each stage's "
                             "output, backprop inside a stage; all: one after every block")
    add_pipeline_link_arguments(parser)
    add_model_arguments(parser)
    # runs saved before edge interfaces / before centred gradients ran without them
    args = parse_training_args(parser, absent={"interfaces": "all", "center_gradients": False},
                               script="main.py", fixed=RUN_DEFINING_FLAGS)
    if world_size_from_env() > 1 and args.forward_unlock:
        parser.error("--forward-unlock is not available in a pipeline (torchrun)")
    if world_size_from_env() > 1 and args.interfaces_at:
        parser.error("--interfaces-at is for one process; under torchrun the stage edges "
                     "(--stages) place the interfaces")
    if args.interfaces == "all" and args.interfaces_at:
        parser.error("--interfaces all and --interfaces-at contradict each other")
    refuse_pipeline_flags(parser, PIPELINE_ONLY_FLAGS)
    if world_size_from_env() == 1 and args.interfaces == "edges":
        parser.error("--interfaces edges needs torchrun; in one process, --interfaces-at "
                     "puts interfaces where a pipeline's stages would end")
    if args.interfaces is None:
        args.interfaces = "edges" if world_size_from_env() > 1 else "all"
    if args.interfaces_at:
        blocks = (args.depth if args.model_type == "mlp" else len(args.channels)) + 1
        at = args.interfaces_at
        if sorted(set(at)) != at or at[-1] >= blocks:
            parser.error(f"--interfaces-at takes increasing block numbers from 1 to "
                         f"{blocks - 1} (the {args.model_type} has {blocks - 1} hidden blocks "
                         f"and a head), got {' '.join(map(str, at))}")
    edges = args.interfaces == "edges" or args.interfaces_at is not None  # or its twin
    defaults = dni_defaults(args.model_type, args.conditioned, edges=edges)
    if args.epochs is None:
        args.epochs = BASELINE_DEFAULTS[args.model_type][0]
    for name in ("batch_size", "synth_lr", "synthesizer"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.synthesizer == defaults["synthesizer"] and args.synth_layers is None:
        args.synth_layers = defaults["synth_layers"]
    if args.synthesizer == "conv" and args.model_type != "cnn":
        parser.error("--synthesizer conv needs --model_type cnn (feature-map activations)")
    return args


def interface_probe(model, conditioned: bool) -> Probe:
    """The loop's DNI extras: the label as context for cDNI; each interface's synthesizer
    loss after every step (sg_loss<i>: the mean since the last row, the epoch's mean); its
    cosine to the true gradient (cos<i>), measured before each logged step and each epoch's
    last step; a non-finite synthetic gradient named by its interface."""
    import torch
    import torch.nn.functional as F

    from experiment.train import Probe

    count = len(model.interfaces)

    def measure(model, x, y):
        cosines = model.gradient_cosines(F.cross_entropy, x, y, context=y if conditioned else None)
        return {f"cos{i}": c for i, c in enumerate(cosines, start=1)}

    def every_step(model):
        return {f"sg_loss{i}": v for i, v in enumerate(model.synthetic_gradient_losses(), start=1)}

    def nonfinite(model):
        for i, interface in enumerate(model.interfaces, start=1):
            if interface.last_loss is not None and not torch.isfinite(interface.last_loss):
                return f"synthetic gradient (or its target) at interface {i}"
        return None

    return Probe(forward=(lambda m, x, y: m(x, context=y)) if conditioned else None,
                 measure=measure, every_step=every_step, nonfinite=nonfinite,
                 columns=[f"{name}{i}" for name in ("sg_loss", "cos")
                          for i in range(1, count + 1)])


def main():
    """Build the DNI model and train it (as a pipeline of processes under torchrun)."""
    args = parse_args()
    from experiment.figures import draw_figures  # torch loads here, once the flags are good
    from experiment.pipeline_train import train_as_pipeline
    from experiment.train import adam, fit

    options = {k: v for k, v in (("hidden_size", args.synth_hidden),
                                 ("num_layers", args.synth_layers)) if v is not None}
    method = "cdni" if args.conditioned else "dni"
    extra = {"synthesizer": args.synthesizer, "synth_lr": args.synth_lr,
             "grad_scale": args.grad_scale, "forward_unlock": args.forward_unlock,
             "center_gradients": args.center_gradients}
    if world_size_from_env() > 1:
        train_as_pipeline(args, lambda: build_network(args.model_type, args),
                          model_name=args.model_type, method=method,
                          synthesizer_options=options, extra_summary=extra)
        # the last stage keeps the records, in the run folder every rank agreed on (args.out)
        if args.baseline and rank_from_env() == world_size_from_env() - 1:
            out_dir = Path(args.out)
            for path in draw_figures([out_dir, *args.baseline], out_dir):
                print(f"figure: {path}")
        return
    device, out_dir, data, checkpoint = prepare_run(args, "main.py")
    net = build_network(args.model_type, args).to(device)
    optimizer = adam(net.parameters(), lr=args.lr)
    model = attach_dni(net, optimizer, data.train_x[:2], synthesizer=args.synthesizer,
                       conditioned=args.conditioned, synthesizer_lr=args.synth_lr,
                       grad_scale=args.grad_scale, forward_unlock=args.forward_unlock,
                       center_gradients=args.center_gradients, after=args.interfaces_at,
                       **options)
    fit(model, optimizer, data, args, script="main.py", model_name=args.model_type,
        method=method, out_dir=out_dir, probe=interface_probe(model, args.conditioned),
        checkpoint=checkpoint, extra_summary={**extra, "interfaces": model.block_names})
    if args.baseline:
        for path in draw_figures([out_dir, *args.baseline], out_dir):
            print(f"figure: {path}")


if __name__ == "__main__":
    run(main)
