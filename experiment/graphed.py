"""One network's training step with no host work per step: the batch is gathered on the device
by a device-side counter, the loss summed on the device, and on a GPU the whole step (gather,
forward with a DNI model's synthetic gradients, backward, optimizer step) is one CUDA graph
replay. For long budgets of small steps (the DNI paper's 500k updates), where launching
hundreds of small kernels one by one, not arithmetic, sets the pace. Elsewhere the same step
runs eagerly, which is how the tests check it against `experiment.train.fit`.

Usage:
    trainer = GraphedTrainer(model, optimizer, data.train_x, data.train_y, batch_size=256)
    trainer.capture()                      # a GPU only; leaves model and optimizer as they were
    for epoch in ...:
        trainer.start_epoch(order)         # a permutation of the training examples
        for _ in range(trainer.steps_per_epoch):
            trainer.set_rate_factor(f)     # the schedule, where it changes
            trainer.step()
        loss = trainer.epoch_loss()        # the one sync of the epoch

Every epoch has `len(train_x) // batch_size` full batches; the rest of the order is left out,
so every update is on `batch_size` examples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F


def one_hot_rows(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float one-hot rows of integer labels, without the host check of `F.one_hot` (no sync,
    so it can be captured)."""
    rows = torch.zeros(len(labels), num_classes, device=labels.device)
    return rows.scatter_(1, labels.unsqueeze(1), 1.0)


class GraphedTrainer:
    """Trains `model` with `optimizer` on fixed-size batches drawn on the device, one step per
    `step()` (a CUDA graph replay on a GPU once `capture()` has run, eager otherwise). Its
    device work goes to its own stream on a GPU, so trainers of several runs interleave.
    `forward(model, x, y)` gives the logits (default `model(x)`; cDNI passes the label)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 train_x: torch.Tensor, train_y: torch.Tensor, batch_size: int,
                 forward: Callable | None = None):
        if not 2 <= batch_size <= len(train_x):
            raise ValueError(f"batch_size must be between 2 and {len(train_x)}, got {batch_size}")
        self.model, self.optimizer = model, optimizer
        self.train_x, self.train_y, self.batch_size = train_x, train_y, batch_size
        self.forward = forward or (lambda m, x, y: m(x))
        self.device = train_x.device
        self.steps_per_epoch = len(train_x) // batch_size
        used = self.steps_per_epoch * batch_size
        self.order = torch.arange(used, device=self.device).view(self.steps_per_epoch, batch_size)
        self.batch = torch.zeros(1, dtype=torch.long, device=self.device)  # next batch's row
        self.loss_sum = torch.zeros((), device=self.device)                # this epoch's
        self.base_rates = [float(group["lr"]) for group in optimizer.param_groups]
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if self.stream is not None:   # rates as tensors: a changed rate reaches a captured step
            for group in optimizer.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.rate_factor = 1.0
        self.steps_left = 0   # in this epoch; a step past the order would index out of range

    def on_stream(self) -> contextlib.AbstractContextManager:
        """Run the enclosed device work on this trainer's stream (a GPU), in order with its
        steps."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _after_current_stream(self) -> None:
        """Order this trainer's stream after the work queued so far on the current one (e.g. a
        checkpoint loaded there)."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def _step(self) -> None:
        """The step as it is captured: the next batch of the epoch's order, forward, backward,
        optimizer step; the loss added on the device; the batch counter moved on."""
        rows = torch.index_select(self.order, 0, self.batch).view(-1)
        x, y = self.train_x.index_select(0, rows), self.train_y.index_select(0, rows)
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.forward(self.model, x, y), y)
        loss.backward()
        self.optimizer.step()
        self.loss_sum.add_(loss.detach())
        self.batch.add_(1)

    def step(self) -> None:
        """One training step (queued on the device; nothing waits for it)."""
        if self.steps_left <= 0:
            raise RuntimeError("the epoch's batches are used up: call start_epoch first")
        self.steps_left -= 1
        with self.on_stream():
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()

    def capture(self, warmup: int = 3) -> None:
        """On a GPU, record the step as a CUDA graph after `warmup` eager steps (which CUDA
        needs before a capture); model and optimizer are then put back as they were, in place,
        so capturing changes no training (the epoch's counters are reset: capture between
        epochs). Elsewhere nothing happens."""
        if self.stream is None:
            return
        groups = self.optimizer.param_groups
        if len(groups) != len(self.base_rates) or not all(
                isinstance(g["lr"], torch.Tensor) and g.get("capturable") for g in groups):
            raise ValueError("every parameter group must exist when the trainer is made, with "
                             "capturable=True (a DNI model: build it with example_input)")
        self._after_current_stream()
        saved = self.state()
        with self.on_stream():
            for _ in range(warmup):
                self._step()
        self.stream.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self.stream):
            self._step()
        self.load_state(saved)
        self.stream.synchronize()

    def start_epoch(self, order: torch.Tensor) -> None:
        """Begin an epoch on this permutation of the training examples (its first
        steps_per_epoch * batch_size entries are used)."""
        used = self.order.numel()
        self._after_current_stream()
        with self.on_stream():
            self.order.view(-1).copy_(order[:used].to(self.device))
            self.batch.zero_()
            self.loss_sum.zero_()
        self.steps_left = self.steps_per_epoch

    def epoch_loss(self) -> float:
        """Mean training loss of the epoch's steps so far (waits for them)."""
        with self.on_stream():
            steps = int(self.batch.item())
            return self.loss_sum.item() / max(steps, 1)

    def set_rate_factor(self, factor: float) -> None:
        """Every group's learning rate becomes its base rate times `factor`, from the next
        queued step on (nothing is done when the factor is unchanged)."""
        if factor == self.rate_factor:
            return
        self.rate_factor = factor
        with self.on_stream():
            for group, base in zip(self.optimizer.param_groups, self.base_rates):
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(base * factor)
                else:
                    group["lr"] = base * factor

    def state(self) -> dict:
        """Copies of the model's and the optimizer's state (for `load_state` or a checkpoint)."""
        with self.on_stream():
            model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            optimizer = [{k: v.clone() if isinstance(v, torch.Tensor) else v
                          for k, v in self.optimizer.state[p].items()}
                         for group in self.optimizer.param_groups for p in group["params"]]
        if self.stream is not None:
            self.stream.synchronize()   # the copies are whole before another stream reads them
        return {"model": model, "optimizer": optimizer, "rate_factor": self.rate_factor}

    def load_state(self, state: dict) -> None:
        """Put back a `state()`, in place (a captured step keeps reading the same memory): a
        parameter without saved optimizer state gets zeroed moments and step count, which is
        Adam as it starts."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if len(params) != len(state["optimizer"]):
            raise ValueError("the saved optimizer state does not fit this optimizer")
        self._after_current_stream()
        with self.on_stream(), torch.no_grad():
            current = self.model.state_dict()
            if set(current) != set(state["model"]):
                raise ValueError("the saved model state does not fit this model")
            for name, value in current.items():
                value.copy_(state["model"][name])
            for p, saved in zip(params, state["optimizer"]):
                for key, value in self.optimizer.state[p].items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    if key in saved:
                        value.copy_(saved[key])
                    else:
                        value.zero_()
                missing = [k for k in saved if k not in self.optimizer.state[p]]
                if missing:  # no step has run yet: the state is created, not overwritten
                    self.optimizer.state[p].update(
                        {k: saved[k].clone() if isinstance(saved[k], torch.Tensor) else saved[k]
                         for k in missing})
            self.batch.zero_()
            self.loss_sum.zero_()
        self.steps_left = 0
        self.rate_factor = -1.0   # force the rates to be written
        self.set_rate_factor(state["rate_factor"])
        if self.stream is not None:   # the copies are done before `state`'s tensors are freed
            self.stream.synchronize()
