"""The MNIST networks: blocks, shapes, and where the interfaces go."""

import torch

from experiment.networks import attach_dni
from model import CNN, FCN


def test_fcn_blocks_and_output():
    net = FCN(depth=4, width=32)
    assert len(net) == 5
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_cnn_blocks_and_output():
    net = CNN(channels=(4, 8, 8))
    assert len(net) == 4
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_interfaces_after_every_hidden_block():
    x = torch.randn(2, 1, 28, 28)
    fcn = FCN(depth=3, width=16)
    model = attach_dni(fcn, torch.optim.Adam(fcn.parameters()), x)
    assert model.block_names == ["0", "1", "2"]
    cnn = CNN(channels=(4, 8))
    model = attach_dni(cnn, torch.optim.Adam(cnn.parameters()), x, synthesizer="conv",
                       conditioned=True, hidden_size=4)
    assert model.block_names == ["0", "1"]
    assert model.context_size == 10
