"""Backprop baseline: the paper's MNIST FCN (Linear-BN-ReLU blocks) trained end to end."""

from experiment.baseline import run_backprop
from experiment.cli import run

if __name__ == "__main__":
    run(lambda: run_backprop("mlp", "mlp.py", __doc__))
