"""Decoupled Neural Interfaces using Synthetic Gradients (Jaderberg et al. 2016) for PyTorch.

Usage: `from dni import DNI; net = DNI(net, optim=opt)`, then train as usual. The algorithm,
written out by hand as the paper states it: `dni.reference.reference_step`.
"""

from dni.interface import Interface, synthesizer_loss
from dni.recurrent import SequenceReport, TruncatedBPTT
from dni.reference import reference_step
from dni.synthesizers import (
    MLP_DNI,
    RNN_DNI,
    Conv_DNI,
    DNI_Network,
    InputSynthesizer,
    Linear_DNI,
    Linear_Sigmoid_DNI,
)
from dni.wrapper import DNI, SYNTHESIZERS, synthesizer_factory

__all__ = [
    "DNI",
    "MLP_DNI",
    "RNN_DNI",
    "SYNTHESIZERS",
    "Conv_DNI",
    "DNI_Network",
    "InputSynthesizer",
    "Interface",
    "Linear_DNI",
    "Linear_Sigmoid_DNI",
    "SequenceReport",
    "TruncatedBPTT",
    "reference_step",
    "synthesizer_factory",
    "synthesizer_loss",
]
