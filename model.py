"""The networks: the paper's MNIST FCN and a small CNN as ordered lists of blocks
(nn.Sequential), the same classes for the backprop baselines and the DNI models (an interface
after every hidden block, every child but the classifier head), and the recurrent tasks'
model. Networks only: the scripts' flags and defaults live in experiment/networks.py."""

from __future__ import annotations

from torch import nn

from dni.recurrent import TruncatedBPTT, state_size
from dni.synthesizers import LinearSynthesizer, MLPSynthesizer, RNNSynthesizer


class FCN(nn.Sequential):
    """Fully connected MNIST net: `depth` blocks of Linear -> BatchNorm -> ReLU, then a Linear
    classifier. Usage: `FCN(depth=3, width=256)`."""

    def __init__(self, depth: int = 3, width: int = 256, in_features: int = 784,
                 num_classes: int = 10):
        blocks = []
        for i in range(depth):
            layers = [nn.Flatten()] if i == 0 else []
            layers += [nn.Linear(in_features if i == 0 else width, width),
                       nn.BatchNorm1d(width), nn.ReLU()]
            blocks.append(nn.Sequential(*layers))
        super().__init__(*blocks, nn.Linear(width, num_classes))


class CNN(nn.Sequential):
    """Convolutional MNIST net: blocks of 5x5 Conv -> BatchNorm -> ReLU -> 2x2 max-pool, then a
    Linear classifier. Usage: `CNN(channels=(32, 64))`."""

    def __init__(self, channels: tuple[int, ...] = (32, 64), num_classes: int = 10,
                 image_size: int = 28):
        blocks, in_ch, size = [], 1, image_size
        for out_ch in channels:
            blocks.append(nn.Sequential(nn.Conv2d(in_ch, out_ch, 5, padding=2),
                                        nn.BatchNorm2d(out_ch), nn.ReLU(), nn.MaxPool2d(2)))
            in_ch, size = out_ch, size // 2
        head = nn.Sequential(nn.Flatten(), nn.Linear(in_ch * size * size, num_classes))
        super().__init__(*blocks, head)


RNN_CORES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
SEQUENCE_SYNTHESIZERS = ("linear", "mlp", "rnn")


class SequenceModel(nn.Module):
    """An RNN core, its linear readout, and the truncated-BPTT trainer (`self.trainer`) with
    its synthesizer of the future gradient (None: plain truncated BPTT). Usage:
    `SequenceModel(9, 8, hidden=128, truncation=3, synthesizer="linear")`."""

    def __init__(self, input_size: int, output_size: int, *, hidden: int = 128,
                 core: str = "lstm", truncation: int = 3, synthesizer: str | None = "linear",
                 synth_hidden: int = 256, discount: float = 1.0, aux_weight: float = 0.0,
                 target_decay: float = 0.0, center: bool = False):
        super().__init__()
        rnn = RNN_CORES[core](input_size, hidden)
        width = state_size(rnn)
        synth = None
        if synthesizer == "linear":
            synth = LinearSynthesizer(width)
        elif synthesizer == "mlp":
            synth = MLPSynthesizer(width, synth_hidden, num_layers=2, batch_norm=False)
        elif synthesizer == "rnn":
            synth = RNNSynthesizer(width, synth_hidden)
        elif synthesizer is not None:
            raise ValueError(f"synthesizer must be one of {SEQUENCE_SYNTHESIZERS} or None")
        self.trainer = TruncatedBPTT(
            rnn, truncation, synthesizer=synth, readout=nn.Linear(hidden, output_size),
            discount=discount, aux_weight=aux_weight, aux_input_size=hidden,
            target_decay=target_decay if synth is not None else 0.0, center=center)

    def network_parameters(self) -> list[nn.Parameter]:
        """Core, readout and aux head: everything trained but the synthesizer (the target
        synthesizer follows it by moving average and is not trained)."""
        synth = set(map(id, self.trainer.synthesizer.parameters())) \
            if self.trainer.synthesizer is not None else set()
        return [p for p in self.parameters() if id(p) not in synth and p.requires_grad]
