"""experiment.graphed: its step trains exactly as `fit` does (the scripts' loop), its state
goes back in place, and it refuses a step past the epoch's batches. The CUDA-graph capture
itself needs a GPU: bench/graph_check.py compares it with the eager step there."""

import argparse

import pytest
import torch

from experiment.data import ImageSplits, load_mnist
from experiment.graphed import GraphedTrainer, one_hot_rows
from experiment.networks import attach_dni
from experiment.schedules import rate_factor
from experiment.train import Probe, adam, fit
from model import FCN

EPOCHS, BATCH, SEED = 2, 40, 3


@pytest.fixture(scope="module")
def data(mnist_root):
    mnist = load_mnist(mnist_root, "cpu", train_size=240)   # 6 full batches an epoch
    mnist.test_x, mnist.test_y = mnist.test_x[:200], mnist.test_y[:200]
    return mnist


def build(method):
    """A small network of the method, seeded, with the scripts' fused Adam."""
    torch.manual_seed(SEED)
    net = FCN(depth=2, width=32)
    optimizer = adam(net.parameters(), lr=1e-2)
    if method == "bp":
        return net, optimizer
    model = attach_dni(net, optimizer, torch.zeros(2, 1, 28, 28), synthesizer="mlp",
                       hidden_size=16, num_layers=3, conditioned=method == "cdni",
                       synthesizer_lr=1e-2, center_gradients=method == "dni")
    return model, optimizer


def forward_of(method):
    """How the graphed trainer calls the model: cDNI with one-hot rows of the label."""
    return (lambda m, x, y: m(x, context=one_hot_rows(y, 10))) if method == "cdni" else None


def train_graphed(model, optimizer, data: ImageSplits, method, schedule="step"):
    trainer = GraphedTrainer(model, optimizer, data.train_x, data.train_y, BATCH,
                             forward_of(method))
    generator = torch.Generator().manual_seed(SEED)   # as fit draws its epochs' orders
    total = EPOCHS * trainer.steps_per_epoch
    step, losses = 0, []
    for _ in range(EPOCHS):
        trainer.start_epoch(torch.randperm(len(data.train_x), generator=generator))
        for _ in range(trainer.steps_per_epoch):
            trainer.set_rate_factor(rate_factor(schedule, step, total))
            trainer.step()
            step += 1
        losses.append(trainer.epoch_loss())
    return trainer, losses


@pytest.mark.parametrize("method", ["dni", "cdni", "bp"])
def test_graphed_steps_train_exactly_as_fit(tmp_path, data, method):
    reference, reference_optimizer = build(method)
    probe = Probe(forward=(lambda m, x, y: m(x, context=y)) if method == "cdni" else None)
    args = argparse.Namespace(epochs=EPOCHS, batch_size=BATCH, lr=1e-2, seed=SEED, log_every=0,
                              train_size=240, schedule="step")
    summary = fit(reference, reference_optimizer, data, args, script="t", model_name="mlp",
                  method=method, out_dir=tmp_path, probe=probe)
    model, optimizer = build(method)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    _, losses = train_graphed(model, optimizer, data, method)
    trained = model.state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(trained[name], value), name
    assert any(not torch.equal(start[k], trained[k]) for k in start)   # it did train
    fit_losses = [row["train_loss"] for row in summary["history"]]
    assert losses == pytest.approx(fit_losses, rel=1e-6)
    # the step schedule reached the optimizer: a hundredth of the rate on the last step
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


def states_equal(a: dict, b: dict) -> bool:
    """Two `GraphedTrainer.state()`s hold the same values."""
    same_model = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    same_optimizer = all(torch.equal(x[k], y[k]) for x, y in zip(a["optimizer"], b["optimizer"])
                         for k in x)
    return same_model and same_optimizer and a["rate_factor"] == b["rate_factor"]


def run_epoch(trainer, order):
    trainer.start_epoch(order)
    for _ in range(trainer.steps_per_epoch):
        trainer.step()


def test_load_state_puts_training_back_in_place(data):
    model, optimizer = build("dni")
    trainer = GraphedTrainer(model, optimizer, data.train_x, data.train_y, BATCH)
    fresh = trainer.state()
    assert all(not saved for saved in fresh["optimizer"])   # Adam has not started
    first, second = torch.randperm(240), torch.randperm(240)
    run_epoch(trainer, first)
    after_first = trainer.state()
    weights = [p for p in model.parameters()]
    run_epoch(trainer, second)
    after_second = trainer.state()
    assert not states_equal(after_first, after_second)
    # back to the end of epoch 1, in place (the same tensors: a captured step keeps them)
    trainer.load_state(after_first)
    assert [p for p in model.parameters()] == weights
    assert states_equal(trainer.state(), after_first)
    run_epoch(trainer, second)
    assert states_equal(trainer.state(), after_second)
    # back to the start: zeroed moments and step counts are Adam as it starts
    trainer.load_state(fresh)
    run_epoch(trainer, first)
    assert states_equal(trainer.state(), after_first)


def test_load_state_refuses_another_network(data):
    model, optimizer = build("bp")
    trainer = GraphedTrainer(model, optimizer, data.train_x, data.train_y, BATCH)
    other_model, other_optimizer = build("dni")
    other = GraphedTrainer(other_model, other_optimizer, data.train_x, data.train_y, BATCH)
    with pytest.raises(ValueError, match="does not fit"):
        trainer.load_state(other.state())


def test_a_step_past_the_epoch_is_refused(data):
    model, optimizer = build("bp")
    trainer = GraphedTrainer(model, optimizer, data.train_x, data.train_y, BATCH)
    with pytest.raises(RuntimeError, match="start_epoch"):
        trainer.step()
    run_epoch(trainer, torch.randperm(240))
    with pytest.raises(RuntimeError, match="start_epoch"):
        trainer.step()


def test_one_hot_rows_match_torch():
    labels = torch.tensor([3, 0, 9, 3])
    assert torch.equal(one_hot_rows(labels, 10),
                       torch.nn.functional.one_hot(labels, 10).float())
