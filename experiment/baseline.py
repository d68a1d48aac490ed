"""The backprop baseline runner behind mlp.py and cnn.py."""

from __future__ import annotations

import argparse

from experiment.cli import add_switch, parse_training_args, prepare_run, training_parser
from experiment.networks import add_model_arguments, build_network

# per model type: (epochs, batch size, learning rate)
BASELINE_DEFAULTS = {"mlp": (20, 128, 1e-3), "cnn": (10, 64, 1e-3)}


def run_backprop(model_type: str, script: str, description: str) -> None:
    """Parse the baseline flags, train `model_type` end to end by backprop, write the summary."""
    epochs, batch_size, lr = BASELINE_DEFAULTS[model_type]
    parser = training_parser(description, epochs=epochs, batch_size=batch_size, lr=lr)
    add_model_arguments(parser, model_type)
    add_switch(parser, "--head-only", "No Bprop, the paper's lower bound: only the classifier "
               "head learns, the hidden blocks keep their random weights")
    args = parse_training_args(parser, script=script, absent={"head_only": False},
                               fixed=("depth", "width", "channels", "batch_size", "train_size",
                                      "seed", "head_only"))
    _, out_dir, data, checkpoint = prepare_run(args, script)
    train_backprop(model_type, args, data, out_dir, script=script, checkpoint=checkpoint)


def train_backprop(model_type: str, args: argparse.Namespace, data, out_dir, *, script: str,
                   checkpoint: dict | None = None) -> dict:
    """Build `model_type` from args, train it by backprop with Adam (only its head with
    args.head_only); return the summary."""
    from experiment.train import adam, fit

    net = build_network(model_type, args).to(data.train_x.device)
    head_only = getattr(args, "head_only", False)
    if head_only:
        for block in list(net)[:-1]:
            block.requires_grad_(False)
    optimizer = adam([p for p in net.parameters() if p.requires_grad], lr=args.lr)
    return fit(net, optimizer, data, args, script=script, model_name=model_type,
               method="no_bprop" if head_only else "backprop", out_dir=out_dir,
               checkpoint=checkpoint)
