"""DNI(net, optim=opt): synthetic-gradient interfaces inside any nn.Module, with the user's
training loop unchanged.

    net = DNI(net, optim=opt)                     # interfaces after every child but the last
    opt.zero_grad(); loss_fn(net(x), y).backward(); opt.step()
    net = DNI(net, optim=opt, context_size=10)    # cDNI: call net(x, context=labels)

Each interface sits at the output of a block (a submodule) through a forward hook, so the
network's own forward code runs as written; below a block's trailing dropout, not above it.
The synthesizers' parameters join `opt` as one extra parameter group (`opt.param_groups[-1]`,
same optimizer class); without `optim` they get their own Adam, `net.synthesizer_optimizer`,
which the caller steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from dni.interface import Interface
from dni.synthesizers import (
    ConvSynthesizer,
    InputSynthesizer,
    LinearSigmoidSynthesizer,
    LinearSynthesizer,
    LossGradientSynthesizer,
    MLPSynthesizer,
    SequenceConvSynthesizer,
    one_hot,
)

SynthesizerFactory = Callable[[tuple, int], nn.Module]
"""Builds a synthesizer from (activation shape without the batch dimension, context size)."""


class _Flat(nn.Module):
    """Runs a vector synthesizer on a flattened activation and restores its shape."""

    def __init__(self, synthesizer: nn.Module, shape: tuple):
        super().__init__()
        self.synthesizer, self.shape = synthesizer, tuple(shape)

    def forward(self, input, hidden=None, context=None):
        """Flatten, synthesize, reshape back."""
        out, hidden = self.synthesizer(input.reshape(len(input), -1), hidden, context=context)
        return out.reshape(len(input), *self.shape), hidden


SYNTHESIZERS = {"linear": LinearSynthesizer, "linear_sigmoid": LinearSigmoidSynthesizer,
                "mlp": MLPSynthesizer, "conv": ConvSynthesizer,
                "sequence_conv": SequenceConvSynthesizer,
                "loss_gradient": LossGradientSynthesizer}


def synthesizer_factory(kind: str, **options) -> SynthesizerFactory:
    """A factory for one of SYNTHESIZERS, chosen by the activation's shape (batch excluded):
    vector kinds act on vectors (d,), per position on sequences (T, d) (one map over d shared
    by every position, never a T d vector), and flatten feature maps (C, H, W); `conv` needs
    (C, H, W), `sequence_conv` (T, d). Options go to the synthesizer's constructor."""
    if kind not in SYNTHESIZERS:
        raise ValueError(f"synthesizer must be one of {sorted(SYNTHESIZERS)}, got {kind!r}")
    cls = SYNTHESIZERS[kind]

    def build(shape: tuple, context_size: int) -> nn.Module:
        if cls is ConvSynthesizer:
            if len(shape) != 3:
                raise ValueError(f"the conv synthesizer needs (C, H, W) activations, got {shape}")
            return ConvSynthesizer(shape[0], context_size=context_size, map_size=shape[1:],
                                   **options)
        if len(shape) == 2:   # a sequence (T, d): per position, or along it (sequence_conv)
            return cls(shape[-1], context_size=context_size, **options)
        if cls is SequenceConvSynthesizer:
            raise ValueError(f"the sequence_conv synthesizer needs (T, d) activations, got "
                             f"{shape}")
        synthesizer = cls(math.prod(shape), context_size=context_size, **options)
        return synthesizer if len(shape) == 1 else _Flat(synthesizer, shape)

    return build


def is_dropout(module: nn.Module) -> bool:
    """Whether `module` is one of torch's dropout layers (Dropout, Dropout1d/2d/3d,
    AlphaDropout, FeatureAlphaDropout), or a plain nn.Sequential of nothing else."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return True
    children = list(module.children())
    return _plain_sequential(module) and bool(children) and all(map(is_dropout, children))


def _plain_sequential(module: nn.Module) -> bool:
    """An nn.Sequential whose forward is Sequential's own (a subclass may add a skip path)."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def interface_site(net: nn.Module, name: str) -> str:
    """Where an interface after block `name` goes: the block itself, or, when it is a plain
    nn.Sequential that ends in dropout layers (none of them in place), the last module before
    them (searched down through nested ones). A synthesizer cannot predict a random mask, so
    it reads the unmasked activation, and the masked one is the next block's input; its
    target then carries the mask, as the true gradient there does."""
    block = net.get_submodule(name)
    while _plain_sequential(block):
        children = list(block.named_children())
        kept = len(children)
        while kept and is_dropout(children[kept - 1][1]):
            kept -= 1
        trailing = [module for _, module in children[kept:]]
        if kept in (0, len(children)) or any(
                getattr(m, "inplace", False) for d in trailing for m in d.modules()):
            break   # no trailing dropout, nothing but dropout, or one that writes in place
        child, block = children[kept - 1]
        name = f"{name}.{child}" if name else child
    return name


@contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """Run `net` in eval mode inside the block; every submodule's own mode is restored after."""
    modes = {m: m.training for m in net.modules()}
    try:
        net.eval()
        yield net
    finally:
        for module, mode in modes.items():
            module.training = mode


@dataclass
class _Pass:
    """What the interfaces need during one training forward pass."""

    context: torch.Tensor | None
    net_input: torch.Tensor
    probe: list | None = None   # diagnostics: collects (h, g) instead of decoupling


class DNI(nn.Module):
    """Wraps any nn.Module so that each chosen block trains on synthetic gradients.

    Usage: `net = DNI(net, optim=opt)`, then the usual loop with `opt.zero_grad()` before the
    forward pass. Blocks: every direct child but the last one called, or `blocks=["layer1", ...]`
    (`block_names` says where the interfaces ended up). Eval mode or no_grad runs `net` alone.

    - `synthesizer_lr`: the rate of the synthesizers' group in `optim` (None: the first group's
      rate now); the group takes the optimizer's other defaults, with weight decay 0.
    - `center_gradients=True`: every interface but the top one (the last called) sends its
      synthetic gradient minus the batch mean. False is the paper's DNI.
    - `cut_before_dropout=True`: a plain nn.Sequential block ending in a (not in-place) dropout
      gets its interface just below it; a dropout child gets none.
    - `batch_mean=False` for losses summed over the batch; `grad_scale` multiplies every
      synthetic gradient; `forward_unlock` feeds each block above an interface a prediction of
      its input; `example_input` builds the interfaces now (do so before an LR scheduler).
    - Sequences: a block's (B, T, d) output gets a synthesizer that acts per position (the
      vector kinds) or along the sequence (`synthesizer="sequence_conv"`); the loss is taken
      to average over all B T positions, which count into the batch (dni/interface.py,
      `examples_in`). cDNI's context may be per position, (B, T) labels or (B, T, k).
    - Skip paths: an interface whose output reaches the loss by more than one path (a skip into
      the head, or two blocks with interfaces reading it) is fit once on the sum of what comes
      back along all of them; its block still receives only its synthetic gradient. A block may
      begin with an in-place operation (each interface hands the next block a copy).

    Why these defaults, with measurements: bench/README.md, "Centring the synthetic gradients"
    and "Cutting below dropout".
    """

    def __init__(self, net: nn.Module, optim: torch.optim.Optimizer | None = None,
                 synthesizer: str | SynthesizerFactory = "linear",
                 blocks: Sequence[str] | None = None, context_size: int = 0,
                 grad_scale: float = 1.0, synthesizer_lr: float | None = None,
                 forward_unlock: bool = False, example_input: torch.Tensor | None = None,
                 batch_mean: bool = True, center_gradients: bool = True,
                 cut_before_dropout: bool = True, **synthesizer_options):
        super().__init__()
        self.net = net
        self.optim = optim
        self.factory = (synthesizer_factory(synthesizer, **synthesizer_options)
                        if isinstance(synthesizer, str) else synthesizer)
        self.requested_blocks = list(blocks) if blocks is not None else None
        self.context_size = context_size
        self.grad_scale = grad_scale
        if synthesizer_lr is not None and not synthesizer_lr > 0:
            raise ValueError(f"synthesizer_lr must be positive (None: the optimizer's), got "
                             f"{synthesizer_lr}")
        self.synthesizer_lr = synthesizer_lr
        self.forward_unlock = forward_unlock
        self.batch_mean = batch_mean
        self.center_gradients = center_gradients
        self.cut_before_dropout = cut_before_dropout
        self.interfaces = nn.ModuleList()
        self.block_names: list[str] = []
        self.synthesizer_optimizer: torch.optim.Optimizer | None = None
        self._pass: _Pass | None = None
        self._built = False
        if example_input is not None:
            self._build(example_input)

    # -- construction -------------------------------------------------------------------
    def _build(self, example_input: torch.Tensor) -> None:
        """Find the blocks and their output shapes with one eval-mode pass, then attach an
        interface (and its synthesizer) after each."""
        names, outputs = self._trace(example_input)
        input_size = math.prod(example_input.shape[1:])
        for position, name in enumerate(names):
            shape, dtype, device = outputs[name]
            synthesizer = self.factory(shape, self.context_size)
            unlock = (InputSynthesizer(input_size, shape, context_size=self.context_size)
                      if self.forward_unlock else None)
            bootstrapped = position < len(names) - 1  # its target is a synthetic gradient
            interface = Interface(synthesizer, self.grad_scale, unlock, self.batch_mean,
                                  center=self.center_gradients and bootstrapped)
            interface.to(device=device, dtype=dtype)
            self.interfaces.append(interface)
            self.net.get_submodule(name).register_forward_hook(self._hook(interface))
        self.block_names = names
        params = list(self.synthesizer_parameters())
        if self.optim is not None:
            first = self.optim.param_groups[0]
            lr = (self.synthesizer_lr if self.synthesizer_lr is not None
                  else first.get("initial_lr", first["lr"]))
            group = {"params": params, "lr": lr}
            if "weight_decay" in self.optim.defaults:
                group["weight_decay"] = 0.0
            self.optim.add_param_group(group)
        elif params:
            lr = self.synthesizer_lr if self.synthesizer_lr is not None else 1e-4
            self.synthesizer_optimizer = torch.optim.Adam(params, lr=lr)
        self._built = True

    def _trace(self, example_input: torch.Tensor) -> tuple[list[str], dict[str, tuple]]:
        """(block names in call order, {name: (output shape without batch, dtype, device)})
        from one no-grad eval pass."""
        if self.requested_blocks is not None:
            candidates = self.requested_blocks
            known = {name for name, _ in self.net.named_modules()}
            unknown = [n for n in candidates if n not in known or n == ""]
            if unknown:
                raise ValueError(f"blocks {unknown} are not submodules of the network")
        else:
            candidates = [name for name, child in self.net.named_children()
                          if not (self.cut_before_dropout and is_dropout(child))]
        if self.cut_before_dropout:
            candidates = [interface_site(self.net, name) for name in candidates]
        order: list[str] = []
        shapes: dict[str, tuple] = {}
        calls: dict[str, int] = {}

        def record(name):
            def hook(module, args, output):
                calls[name] = calls.get(name, 0) + 1
                if name not in shapes:
                    if not isinstance(output, torch.Tensor):
                        raise TypeError(f"block {name!r} returns {type(output).__name__}; an "
                                        "interface needs a tensor output (choose blocks=)")
                    order.append(name)
                    shapes[name] = (tuple(output.shape[1:]), output.dtype, output.device)
            return hook

        handles = [self.net.get_submodule(n).register_forward_hook(record(n)) for n in candidates]
        try:
            with eval_mode(self.net), torch.no_grad():
                self.net(example_input)
        finally:
            for handle in handles:
                handle.remove()
        repeated = [n for n in order if calls[n] > 1]
        if repeated:
            hint = ("name the blocks with blocks=" if not self.cut_before_dropout else
                    "name the blocks with blocks=, or cut_before_dropout=False keeps the "
                    "interfaces at the blocks' outputs")
            raise ValueError(f"blocks {repeated} are called more than once in a forward pass; an "
                             f"interface needs a block called once ({hint})")
        if self.requested_blocks is None:
            order = order[:-1]  # the last block called ends in the loss: no interface after it
        else:
            missing = [n for n in candidates if n not in shapes]
            if missing:
                raise ValueError(f"blocks {missing} were not called by the network's forward")
        if not order:
            raise ValueError("DNI needs at least two blocks (one interface) in the network")
        return order, shapes

    def _hook(self, interface: Interface):
        """The forward hook that puts `interface` at a block's output during training."""
        def hook(module, args, output):
            state = self._pass
            if state is None:
                return None
            if state.probe is not None:
                with torch.no_grad():
                    synthetic = interface.predict(output, state.context) / interface.unit(output)
                state.probe.append((output, synthetic))
                return output.clone()   # the next block may write its input in place
            return interface(output, state.context, state.net_input)
        return hook

    # -- use ----------------------------------------------------------------------------
    def synthesizer_parameters(self):
        """Parameters of all synthesizers (and input synthesizers)."""
        return self.interfaces.parameters()

    def _context(self, context: torch.Tensor | None) -> torch.Tensor | None:
        """The context as synthesizers take it: labels become one-hot vectors."""
        if self.context_size == 0:
            if context is not None:
                raise ValueError("context given, but this DNI was built with context_size=0")
            return None
        if context is None:
            raise ValueError("this DNI is conditioned (cDNI): call net(x, context=labels)")
        return one_hot(context, self.context_size)

    def forward(self, x: torch.Tensor, *args, context: torch.Tensor | None = None, **kwargs):
        """The network's forward; in training, each block gets its synthetic gradient at once.
        `context` (cDNI): integer labels or float vectors of size context_size."""
        if not self._built:
            self._build(x)
        if not (self.training and torch.is_grad_enabled()):
            return self.net(x, *args, **kwargs)
        self._pass = _Pass(self._context(context), x)
        try:
            return self.net(x, *args, **kwargs)
        finally:
            self._pass = None

    def synthetic_and_true_gradients(self, loss_fn: Callable, x: torch.Tensor,
                                     target: torch.Tensor, context: torch.Tensor | None = None
                                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(synthetic g_i, true dL/dh_i) at every interface for one batch, both in the loss's
        units (the gradient each block would receive, before grad_scale), by an extra full
        backward pass that leaves parameters, gradients and BatchNorm statistics untouched."""
        if not self._built:
            self._build(x)
        buffers = {name: b.clone() for name, b in self.named_buffers()}
        self._pass = _Pass(self._context(context), x, probe=[])
        devices = [x.device] if x.device.type == "cuda" else []
        try:  # forked RNG: dropout in this pass leaves training's random stream as it was
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                loss = loss_fn(self.net(x), target)
                probe = self._pass.probe
                true = torch.autograd.grad(loss, [h for h, _ in probe], allow_unused=True)
        finally:
            self._pass = None
            with torch.no_grad():
                for name, b in self.named_buffers():
                    b.copy_(buffers[name])
        return [(g, torch.zeros_like(g) if t is None else t) for (_, g), t in zip(probe, true)]

    def gradient_cosines(self, loss_fn: Callable, x: torch.Tensor, target: torch.Tensor,
                         context: torch.Tensor | None = None) -> list[float]:
        """Cosine similarity between each interface's synthetic gradient and the true one
        (whole batch as one vector), measured without touching training."""
        pairs = self.synthetic_and_true_gradients(loss_fn, x, target, context)
        return [torch.nn.functional.cosine_similarity(g.flatten(), t.flatten(), dim=0).item()
                for g, t in pairs]

    def synthetic_gradient_losses(self) -> list[float]:
        """Each interface's synthesizer regression loss on the last training step (nan before
        the first)."""
        return [float("nan") if i.last_loss is None else i.last_loss.item()
                for i in self.interfaces]
