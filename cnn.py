"""Backprop baseline: the MNIST CNN (Conv-BN-ReLU-pool blocks) trained end to end."""

from experiment.baseline import run_backprop
from experiment.cli import run

if __name__ == "__main__":
    run(lambda: run_backprop("cnn", "cnn.py", __doc__))
