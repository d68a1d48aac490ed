"""A character language model, an LSTM trained with truncated BPTT, DNI or DNI+Aux, or a GPT
trained with backprop or DNI at cuts between its blocks, scored in bits per character on the
validation and test splits, with early stopping on validation.

Usage: python lm.py [--model lstm] --method bptt|dni|dni_aux --truncation T [--steps N]
       python lm.py --model gpt --method bp|dni [--conditioned True] [--cuts 2] [--steps N]
       (either with [--out DIR] [--resume DIR])
"""

from experiment.cli import run
from experiment.lm_flags import parse_args
from experiment.records import world_size_from_env


def main():
    """Parse the flags (before torch loads), then train."""
    args = parse_args()
    if world_size_from_env() > 1:   # under torchrun: the GPT as a pipeline of stages
        from experiment.lm_pipeline import train_as_pipeline as train
    else:
        from experiment.lm_train import train
    train(args)


if __name__ == "__main__":
    run(main)
