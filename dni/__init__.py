"""Decoupled Neural Interfaces using Synthetic Gradients (Jaderberg et al. 2016) for PyTorch.

Usage: `from dni import DNI; net = DNI(net, optim=opt)`, then train as usual. The seed's
names `Linear_DNI`, `Linear_Sigmoid_DNI`, `RNN_DNI` and `DNI_Network` are aliases of
`LinearSynthesizer`, `LinearSigmoidSynthesizer`, `RNNSynthesizer` and `Synthesizer`. The algorithm,
written out by hand as the paper states it: `dni.reference.reference_step`.
"""

from dni.interface import Interface, synthesizer_loss
from dni.recurrent import SequenceReport, TruncatedBPTT
from dni.reference import reference_step
from dni.synthesizers import (
    RNN_DNI,
    ConvSynthesizer,
    DNI_Network,
    InputSynthesizer,
    Linear_DNI,
    Linear_Sigmoid_DNI,
    LinearSigmoidSynthesizer,
    LinearSynthesizer,
    MLPSynthesizer,
    RNNSynthesizer,
    Synthesizer,
)
from dni.wrapper import DNI, SYNTHESIZERS, synthesizer_factory

__all__ = [
    "DNI",
    "RNN_DNI",
    "SYNTHESIZERS",
    "ConvSynthesizer",
    "DNI_Network",
    "InputSynthesizer",
    "Interface",
    "LinearSigmoidSynthesizer",
    "LinearSynthesizer",
    "Linear_DNI",
    "Linear_Sigmoid_DNI",
    "MLPSynthesizer",
    "RNNSynthesizer",
    "SequenceReport",
    "Synthesizer",
    "TruncatedBPTT",
    "reference_step",
    "synthesizer_factory",
    "synthesizer_loss",
]
