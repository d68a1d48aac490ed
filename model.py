"""The networks: the paper's MNIST FCN and a small CNN as ordered lists of blocks
(nn.Sequential), the same classes for the backprop baselines and the DNI models (an interface
after every hidden block, every child but the classifier head), the recurrent tasks' model,
and a small GPT-style decoder, also an nn.Sequential of blocks. Networks only: the scripts'
flags and defaults live in experiment/networks.py and experiment/lm_flags.py."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
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
SEQUENCE_SYNTHESIZERS = ("linear", "lowrank", "mlp", "rnn")


class SequenceModel(nn.Module):
    """An RNN core, its linear readout, and the truncated-BPTT trainer (`self.trainer`) with
    its synthesizer of the future gradient (None: plain truncated BPTT). Usage:
    `SequenceModel(9, 8, hidden=128, truncation=3, synthesizer="linear")`."""

    def __init__(self, input_size: int, output_size: int, *, hidden: int = 128,
                 core: str = "lstm", truncation: int = 3, synthesizer: str | None = "linear",
                 synth_hidden: int = 256, discount: float = 1.0, aux_weight: float = 0.0,
                 target_decay: float = 0.0, center: bool = False, input_window: int = 0):
        super().__init__()
        rnn = RNN_CORES[core](input_size, hidden)
        width = state_size(rnn)
        synth = None
        context = input_window * input_size               # the last inputs S sees
        if synthesizer == "linear":
            synth = LinearSynthesizer(width, context_size=context)
        elif synthesizer == "lowrank":   # linear through synth_hidden units: cheaper when fewer
            synth = LinearSynthesizer(width, synth_hidden, context_size=context, num_layers=2)
        elif synthesizer == "mlp":
            synth = MLPSynthesizer(width, synth_hidden, context_size=context, num_layers=2,
                                   batch_norm=False)
        elif synthesizer == "rnn":
            synth = RNNSynthesizer(width, synth_hidden, context_size=context)
        elif synthesizer is not None:
            raise ValueError(f"synthesizer must be one of {SEQUENCE_SYNTHESIZERS} or None")
        self.trainer = TruncatedBPTT(
            rnn, truncation, synthesizer=synth, readout=nn.Linear(hidden, output_size),
            discount=discount, aux_weight=aux_weight, aux_input_size=hidden,
            target_decay=target_decay if synth is not None else 0.0, center=center,
            input_window=input_window if synth is not None else 0)

    def network_parameters(self) -> list[nn.Parameter]:
        """Core, readout and aux head: everything trained but the synthesizer (the target
        synthesizer follows it by moving average and is not trained)."""
        synth = set(map(id, self.trainer.synthesizer.parameters())) \
            if self.trainer.synthesizer is not None else set()
        return [p for p in self.parameters() if id(p) not in synth and p.requires_grad]


class TokenEmbedding(nn.Module):
    """Token ids (B, T) -> (B, T, d): a token embedding plus a learned embedding of each
    position (T at most `context`)."""

    def __init__(self, vocab_size: int, width: int, context: int):
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(context, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedded sequence, (B, T, d)."""
        length = ids.shape[1]
        if length > self.context:
            raise ValueError(f"a sequence of {length} tokens is longer than the context "
                             f"({self.context})")
        return self.tokens(ids) + self.positions(torch.arange(length, device=ids.device))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t attends to positions 0..t."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, d)."""
        batch, length, width = x.shape
        q, k, v = (part.view(batch, length, self.heads, width // self.heads).transpose(1, 2)
                   for part in self.qkv(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class TransformerBlock(nn.Module):
    """A pre-LayerNorm decoder block: x + attention(LN(x)), then x + MLP(LN(x)) with a 4d
    GELU hidden layer; (B, T, d) in and out."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, d)."""
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Sequential):
    """A small GPT-style decoder as a stack of blocks: children [embedding, block 1 .. block
    N, head], each block (B, T, d) -> (B, T, d); the head (final LayerNorm and a linear map)
    gives next-token logits (B, T, vocab). `DNI(gpt, blocks=["2"])` cuts it after block 2.
    Usage: `GPT(vocab_size, width=128, layers=4, heads=4, context=64)`."""

    def __init__(self, vocab_size: int, width: int = 128, layers: int = 4, heads: int = 4,
                 context: int = 64):
        super().__init__(TokenEmbedding(vocab_size, width, context),
                         *(TransformerBlock(width, heads) for _ in range(layers)),
                         nn.Sequential(nn.LayerNorm(width), nn.Linear(width, vocab_size)))
        self.context = context
        for module in self.modules():   # GPT-2's initialisation
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def __getitem__(self, index):
        """A child, or a run of children as a plain nn.Sequential (e.g. a pipeline stage)."""
        if isinstance(index, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[index]))
        return super().__getitem__(index)
