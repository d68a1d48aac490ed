"""A character language model trained with truncated BPTT, DNI or DNI+Aux, scored in bits per
character on the validation and test splits, with early stopping on validation.

Usage: python lm.py --method bptt|dni|dni_aux --truncation T [--steps N] [--out DIR]
       [--resume DIR]
"""

from experiment.cli import run
from experiment.lm_flags import parse_args


def main():
    """Parse the flags (before torch loads), then train."""
    args = parse_args()
    from experiment.lm_train import train

    train(args)


if __name__ == "__main__":
    run(main)
