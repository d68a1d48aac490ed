"""The library's defaults on networks and data the project did not tune for (bench/generality.py
at test size): scikit-learn's digits, a residual MLP and an MLP with LayerNorm and dropout."""

import pytest
import torch

from bench.generality import NETWORKS, table, train_cell
from dni import DNI
from experiment.data import DIGITS_TEST_SIZE, load_digits


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_split_is_fixed_standardised_and_disjoint(digits):
    again = load_digits()
    assert digits.train_x.shape == (1797 - DIGITS_TEST_SIZE, 1, 8, 8)
    assert digits.test_x.shape == (DIGITS_TEST_SIZE, 1, 8, 8)
    assert torch.equal(digits.test_y, again.test_y) and torch.equal(digits.train_x, again.train_x)
    assert set(digits.test_y.tolist()) == set(range(10)) and digits.num_classes == 10
    assert abs(digits.train_x.mean().item()) < 1e-5 and abs(digits.train_x.std().item() - 1) < 1e-4
    rows = {tuple(r.tolist()) for r in digits.train_x.flatten(1)}
    assert sum(tuple(r.tolist()) in rows for r in digits.test_x.flatten(1)) < 5  # a few twins


@pytest.mark.parametrize("network, names", [("residual", ["0", "1", "2", "3"]),
                                            ("layernorm_dropout", ["0.3", "1.2", "2.2"])])
def test_networks_get_an_interface_after_every_block_but_the_head(network, names):
    """After every block but the head; in layernorm_dropout, before each block's dropout."""
    net = NETWORKS[network](64, 10)
    model = DNI(net, optim=torch.optim.Adam(net.parameters()), example_input=torch.zeros(2, 1, 8, 8))
    assert model.block_names == names
    assert [i.center for i in model.interfaces] == [True] * (len(names) - 1) + [False]


@pytest.mark.parametrize("network", ["residual", "layernorm_dropout"])
def test_library_defaults_beat_the_old_defaults_after_two_epochs(digits, network):
    """DNI(net, optim=opt) as it now is (synthetic gradients centred below the top interface)
    against the old default (uncentred), 2 epochs of digits, two seeds: at least 3 points
    better on average, and both learn (the old default is far above chance, 10%)."""
    new = [train_cell(network, digits, "dni", 2, seed)[-1] for seed in (0, 1)]
    old = [train_cell(network, digits, "dni_uncentred", 2, seed)[-1] for seed in (0, 1)]
    assert min(old) > 0.4
    assert sum(new) / 2 >= sum(old) / 2 + 0.03, (new, old)


def test_table_reports_each_method_against_backprop(tmp_path):
    for method, accuracies in (("bp", [0.5, 0.9]), ("dni", [0.4, 0.85])):
        (tmp_path / f"digits-residual-{method}-s0.json").write_text(
            f'{{"test_acc": {accuracies}}}')
    rows = table(tmp_path, ["residual"], ["digits"], ["bp", "dni", "cdni"], [0], 2)
    assert rows[2] == "| digits | residual | backprop | 90.00% |"
    assert rows[3] == "| digits | residual | DNI(net, optim=opt) | 85.00% (-5.00) |"
    assert rows[4] == "| digits | residual | cDNI (context_size=10) |  |"


def test_the_cut_below_dropout_beats_the_cut_above_it(mnist_root):
    """DNI(net, optim=opt) now puts each interface of layernorm_dropout below the block's
    dropout; above it (the old default) the synthesizer sees a random mask it cannot predict.
    10,000 MNIST images, 4 epochs, two seeds: at least 2.5 points better on average."""
    import dataclasses

    from experiment.data import load_mnist

    mnist = load_mnist(mnist_root)
    small = dataclasses.replace(mnist, train_x=mnist.train_x[:10_000],
                                train_y=mnist.train_y[:10_000], test_x=mnist.test_x[:2000],
                                test_y=mnist.test_y[:2000])
    new = [train_cell("layernorm_dropout", small, "dni", 4, seed)[-1] for seed in (0, 1)]
    old = [train_cell("layernorm_dropout", small, "dni_above_dropout", 4, seed)[-1]
           for seed in (0, 1)]
    assert min(old) > 0.5
    assert sum(new) / 2 >= sum(old) / 2 + 0.025, (new, old)
