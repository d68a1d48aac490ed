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


def test_lowrank_sequence_synthesizer_is_linear_through_its_rank():
    """`synthesizer="lowrank"`: S(x) = W2 (W1 x + b1) + b2 with W2 W1 of rank synth_hidden,
    zero at the start as every synthesizer."""
    from model import SequenceModel

    torch.manual_seed(0)
    model = SequenceModel(3, 2, hidden=8, synthesizer="lowrank", synth_hidden=3)
    synth = model.trainer.synthesizer
    x = torch.randn(5, 16)
    assert torch.equal(synth(x)[0], torch.zeros(5, 16))
    for p in synth.parameters():
        torch.nn.init.normal_(p)
    jacobian = torch.autograd.functional.jacobian(lambda v: synth(v[None])[0][0], x[0])
    assert torch.linalg.matrix_rank(jacobian) == 3
    assert torch.allclose(synth(2 * x)[0] - synth(x)[0], synth(x)[0] - synth(0 * x)[0],
                          atol=1e-5)   # affine
