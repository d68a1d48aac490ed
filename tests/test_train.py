"""The shared training loop in-process: interruption at chosen steps and exact resume."""

import argparse
import os
import signal

import pytest
import torch

from experiment.data import load_mnist
from experiment.errors import RunInterrupted
from experiment.networks import attach_dni
from experiment.records import load_checkpoint
from experiment.train import Probe, fit
from model import FCN


@pytest.fixture(scope="module")
def data(mnist_root):
    mnist = load_mnist(mnist_root, "cpu", train_size=240)
    mnist.test_x, mnist.test_y = mnist.test_x[:500], mnist.test_y[:500]
    return mnist


def args(**overrides):
    base = {"epochs": 3, "batch_size": 40, "lr": 1e-3, "seed": 3, "log_every": 1,
            "train_size": 240}
    return argparse.Namespace(**{**base, **overrides})


def build(dni):
    torch.manual_seed(3)
    net = FCN(depth=2, width=32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    model = attach_dni(net, opt, torch.zeros(2, 1, 28, 28), synthesizer_lr=1e-3) if dni else net
    return model, opt


def kill_at(step):
    """A probe that sends this process SIGTERM during optimizer step `step` (0-based)."""
    count = {"n": 0}

    def after(model):
        count["n"] += 1
        if count["n"] == step + 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    return Probe(every_step=after)


# 6 steps an epoch: mid-epoch 1, its last step, first step of epoch 2, the run's last step
@pytest.mark.parametrize("dni, stop_after", [(True, 2), (True, 5), (False, 6), (True, 17)])
def test_interrupt_at_any_step_then_resume_is_bit_identical(tmp_path, data, dni, stop_after):
    (tmp_path / "ref").mkdir()
    model, opt = build(dni)
    reference = fit(model, opt, data, args(), script="t", model_name="mlp", method="m",
                    out_dir=tmp_path / "ref")
    want = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt = build(dni)
    (tmp_path / "cut").mkdir()
    with pytest.raises(RunInterrupted):
        fit(model, opt, data, args(), script="t", model_name="mlp", method="m",
            out_dir=tmp_path / "cut", probe=kill_at(stop_after))
    checkpoint = load_checkpoint(tmp_path / "cut", torch.device("cpu"))
    assert checkpoint["state"]["step"] == stop_after + 1
    model, opt = build(dni)
    resumed = fit(model, opt, data, args(), script="t", model_name="mlp", method="m",
                  out_dir=tmp_path / "cut", checkpoint=checkpoint)
    for key, value in model.state_dict().items():
        assert torch.equal(value, want[key]), key
    assert [h["test_acc"] for h in resumed["history"]] == \
        [h["test_acc"] for h in reference["history"]]
    assert resumed["train_loss"] == reference["train_loss"]
