"""Decoupled Neural Interfaces using Synthetic Gradients (Jaderberg et al. 2016) for PyTorch.

Usage: `from dni import DNI; net = DNI(net, optim=opt)`, then train as usual. The seed's
names `Linear_DNI`, `Linear_Sigmoid_DNI`, `RNN_DNI` and `DNI_Network` are aliases of
`LinearSynthesizer`, `LinearSigmoidSynthesizer`, `RNNSynthesizer` and `Synthesizer`. The algorithm,
written out by hand as the paper states it: `dni.reference.reference_step`.
"""

from dni._lazy import lazy_exports as _lazy_exports

# each name loads its module, and torch, on first use
__all__, __getattr__, __dir__ = _lazy_exports(__name__, {
    "interface": ("Interface", "synthesizer_loss"),
    "recurrent": ("SequenceReport", "TruncatedBPTT"),
    "reference": ("reference_step",),
    "synthesizers": ("RNN_DNI", "ConvSynthesizer", "DNI_Network", "InputSynthesizer",
                     "Linear_DNI", "Linear_Sigmoid_DNI", "LinearSigmoidSynthesizer",
                     "LinearSynthesizer", "LossGradientSynthesizer", "MLPSynthesizer",
                     "RNNSynthesizer", "SequenceConvSynthesizer", "Synthesizer"),
    "wrapper": ("DNI", "SYNTHESIZERS", "synthesizer_factory"),
})
