"""Recurrent DNI on sequence tasks: an LSTM trained with truncated BPTT (chunks of T steps),
with a synthetic gradient of the future at every chunk edge (DNI), or with DNI and the
auxiliary task (DNI+Aux), under the copy tasks' curriculum; reports the longest length solved.

Usage: python rnn_tasks.py --task copy|repeat_copy|add|argmax --method bptt|dni|dni_aux
       --truncation T [--steps N] [--out DIR] [--resume DIR]
"""

from experiment.cli import run
from experiment.rnn_train import parse_args, train


def main():
    """Parse the flags and train."""
    train(parse_args())


if __name__ == "__main__":
    run(main)
