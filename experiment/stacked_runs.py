"""Several independent runs of one model in one process: K copies of a network whose weights
are stacked along a new first dimension, so that one batched matrix product does the work of
K small ones (on a CPU the per-operation overhead of a small LSTM dominates its step; on a GPU
K runs fill what one cannot).

`stack_runs(models)` turns K models of the same shape into one whose nn.LSTM and nn.Linear
layers hold the K runs' weights side by side, under the same parameter names and in the same
order; its inputs carry the runs' examples run-major along the batch dimension (run k owns
columns k*B .. k*B+B-1). `run_state_dict(stacked, k)` and `stack_state_dicts` move model and
optimizer states between the stacked model and the K single ones, so a run's checkpoint is
the same file whichever way it was trained.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class StackedLinear(nn.Module):
    """K linear layers side by side: weight (K, out, in), bias (K, out); the input's
    second-to-last dimension holds the K runs' rows, run-major."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.runs = len(layers)
        self.in_features, self.out_features = layers[0].in_features, layers[0].out_features
        self.weight = _stacked([layer.weight for layer in layers])
        self.bias = _stacked([layer.bias for layer in layers])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each run's rows through its own layer."""
        lead, rows = x.shape[:-2], x.shape[-2]
        by_run = x.reshape(-1, self.runs, rows // self.runs, x.shape[-1]).transpose(0, 1)
        by_run = by_run.reshape(self.runs, -1, x.shape[-1])             # (K, n, in)
        out = torch.baddbmm(self.bias.unsqueeze(1), by_run, self.weight.transpose(1, 2))
        out = out.view(self.runs, -1, rows // self.runs, self.out_features).transpose(0, 1)
        return out.reshape(*lead, rows, self.out_features)


class StackedLSTM(nn.Module):
    """K one-layer LSTMs side by side, nn.LSTM's gates and parameter names with a leading run
    dimension; input (T, K*B, I) and state (h, c), each (1, K*B, H), as nn.LSTM takes."""

    def __init__(self, lstms: list[nn.LSTM]):
        super().__init__()
        first = lstms[0]
        if first.num_layers != 1 or first.bidirectional or first.batch_first or \
                first.proj_size or not first.bias:
            raise ValueError("stacked runs take a one-layer, one-way LSTM with biases, "
                             "time-major")
        self.runs, self.hidden_size = len(lstms), first.hidden_size
        self.input_size = first.input_size
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            setattr(self, name, _stacked([getattr(lstm, name) for lstm in lstms]))

    def zero_state(self, batch: int, device=None, dtype=None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, c) of zeros for `batch` rows (all runs' examples), as nn.LSTM's."""
        like = self.weight_hh_l0
        return tuple(torch.zeros(1, batch, self.hidden_size, device=device or like.device,
                                 dtype=dtype or like.dtype) for _ in range(2))

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(outputs (T, K*B, H), (h, c)) after the chunk x (T, K*B, I) from `state`."""
        steps, rows, k = x.shape[0], x.shape[1], self.runs
        batch, width = rows // k, self.hidden_size
        by_run = x.view(steps, k, batch, -1).transpose(0, 1).reshape(k, steps * batch, -1)
        bias = (self.bias_ih_l0 + self.bias_hh_l0).unsqueeze(1)
        inputs = torch.baddbmm(bias, by_run, self.weight_ih_l0.transpose(1, 2))
        inputs = inputs.view(k, steps, batch, 4 * width)
        recurrent = self.weight_hh_l0.transpose(1, 2)
        h, c = (s.view(k, batch, width) for s in state)
        outputs = []
        for t in range(steps):      # few operations a step: on a GPU each is a kernel launch
            gates = torch.baddbmm(inputs[:, t], h, recurrent)
            i, f, _, o = torch.sigmoid(gates).chunk(4, dim=2)
            g = torch.tanh(gates[..., 2 * width:3 * width])
            c = torch.addcmul(f * c, i, g)
            h = o * torch.tanh(c)
            outputs.append(h)
        y = torch.stack(outputs, 1).transpose(0, 1).reshape(steps, rows, width)
        return y, (h.reshape(1, rows, width), c.reshape(1, rows, width))


def _stacked(tensors: list[torch.Tensor]) -> nn.Parameter:
    """The runs' tensors stacked along a new first dimension, trained as the first was."""
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).clone(),
                        requires_grad=tensors[0].requires_grad)


def stack_runs(models: list[nn.Module]) -> nn.Module:
    """One model holding the K models' weights side by side (same names, same order): each
    nn.LSTM becomes a StackedLSTM, each nn.Linear a StackedLinear; any other layer with
    weights is refused. The result's `runs` attributes (a TruncatedBPTT's among them) say K."""
    stacked = copy.deepcopy(models[0])
    for name, module in list(stacked.named_modules()):
        if name == "":
            continue
        peers = [m.get_submodule(name) for m in models]
        if isinstance(module, nn.LSTM):
            replacement: nn.Module = StackedLSTM(peers)
        elif isinstance(module, nn.Linear):
            replacement = StackedLinear(peers)
        else:
            if any(True for _ in module.parameters(recurse=False)):
                raise ValueError(f"stacked runs cannot hold a {type(module).__name__} "
                                 f"({name}): LSTM and linear layers only")
            continue
        parent, _, child = name.rpartition(".")
        setattr(stacked.get_submodule(parent) if parent else stacked, child, replacement)
    for module in stacked.modules():
        if hasattr(module, "runs"):
            module.runs = len(models)
    return stacked


def run_state_dict(stacked_state: dict, k: int) -> dict:
    """Run k's model state dict out of the stacked model's (copies, not views)."""
    return {name: value[k].clone() for name, value in stacked_state.items()}


def run_optimizer_state(stacked_state: dict, k: int) -> dict:
    """Run k's state dict of an optimizer (Adam's kind: per-parameter tensors with the run
    first, and a shared step count) out of the stacked optimizer's."""
    return {"state": {i: {key: value if key == "step" else value[k].clone()
                          for key, value in per_param.items()}
                      for i, per_param in stacked_state["state"].items()},
            "param_groups": copy.deepcopy(stacked_state["param_groups"])}


def stack_optimizer_states(states: list[dict]) -> dict:
    """The stacked optimizer's state dict from the K runs' (inverse of
    `run_optimizer_state`; the runs must be at the same step)."""
    first = states[0]
    return {"state": {i: {key: value if key == "step" else
                          torch.stack([s["state"][i][key] for s in states])
                          for key, value in per_param.items()}
                      for i, per_param in first["state"].items()},
            "param_groups": copy.deepcopy(first["param_groups"])}
