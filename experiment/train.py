"""The training loop every script shares: mini-batches by index, a progress bar, one line per
epoch, evaluation, and summary.json. The loop is plain backprop-style PyTorch; a DNI model runs
through it unchanged (its synthetic gradients happen inside its forward)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from experiment.data import MNIST, batch_order, batches, num_batches
from experiment.errors import UserError


@dataclass
class Probe:
    """Optional extras a method adds to the loop.

    `forward(model, x, y)` runs the model on a training batch (default: `model(x)`);
    `diagnose(model, x, y, step)` runs before every `every`-th step and must not touch
    training; `epoch_fields()` returns named figures for the epoch line and the summary.
    """

    forward: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    diagnose: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, int], None] | None = None
    every: int = 0
    epoch_fields: Callable[[], dict[str, float]] = field(default=lambda: {})


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (fraction) of the model in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for xb, yb in batches(x, y, batch_size):
            out = model(xb)
            total_loss += F.cross_entropy(out, yb, reduction="sum").item()
            correct += (out.argmax(1) == yb).sum().item()
    model.train(was_training)
    return total_loss / len(x), correct / len(x)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay of every parameter group's learning rate from its value to 0."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def format_fields(fields: dict[str, float]) -> str:
    """'name value' pairs for the epoch line, compact but readable."""
    parts = []
    for name, value in fields.items():
        parts.append(f"{name} {value:.3g}" if abs(value) < 1e-2 and value else f"{name} {value:.4f}")
    return "  ".join(parts)


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: MNIST, args,
        *, script: str, model_name: str, method: str, out_dir: Path,
        probe: Probe | None = None, extra_summary: dict | None = None) -> dict:
    """Train for args.epochs with a cosine learning-rate decay; print a line per epoch;
    write and return the summary."""
    probe = probe or Probe()
    device = data.train_x.device
    generator = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = num_batches(len(data.train_x), args.batch_size)
    scheduler = cosine_schedule(optimizer, args.epochs * steps_per_epoch)
    forward = probe.forward or (lambda m, x, y: m(x))
    history, step = [], 0
    train_seconds = data_seconds = 0.0
    samples = 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = batch_order(len(data.train_x), generator, device)
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        epoch_samples = 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{args.epochs}", leave=False,
                   disable=None, file=sys.stderr)
        tick = time.perf_counter()
        for x, y in batches(data.train_x, data.train_y, args.batch_size, order):
            now = time.perf_counter()
            data_seconds += now - tick
            if probe.diagnose and probe.every and step % probe.every == 0:
                probe.diagnose(model, x, y, step)
                diagnosed = time.perf_counter()
                tick += diagnosed - now  # diagnostics are not training time
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(forward(model, x, y), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(y)
            epoch_samples += len(y)
            step += 1
            bar.update()
            now = time.perf_counter()
            train_seconds += now - tick  # the whole step, data path included
            tick = now
        bar.close()
        train_loss = loss_sum.item() / epoch_samples
        if not math.isfinite(train_loss):
            raise UserError(f"training diverged in epoch {epoch} (loss {train_loss}); "
                            "lower --lr")
        samples += epoch_samples
        test_loss, test_acc = evaluate(model, data.test_x, data.test_y)
        extras = probe.epoch_fields()
        seconds = time.perf_counter() - epoch_start
        record = {"epoch": epoch, "train_loss": train_loss, "test_loss": test_loss,
                  "test_acc": test_acc, "seconds": seconds, **extras}
        history.append(record)
        print(f"epoch {epoch:>3}/{args.epochs}  train_loss {train_loss:.4f}  "
              f"test_loss {test_loss:.4f}  test_acc {100 * test_acc:.2f}%  {seconds:.1f}s"
              + (f"  {format_fields(extras)}" if extras else ""), flush=True)
    summary = {
        "script": script, "model": model_name, "method": method, "epochs": args.epochs,
        "test_acc": history[-1]["test_acc"], "test_loss": history[-1]["test_loss"],
        "train_seconds": train_seconds, "samples_per_s": samples / train_seconds,
        "data_seconds": data_seconds, "device": str(device), "seed": args.seed,
        "batch_size": args.batch_size, "lr": args.lr, "train_size": len(data.train_x),
        "argv": sys.argv, "train_loss": history[-1]["train_loss"], **extras,
        **(extra_summary or {}), "history": history,
    }
    write_json(out_dir / "summary.json", summary)
    print(f"test accuracy {100 * summary['test_acc']:.2f}%  "
          f"({summary['samples_per_s']:.0f} samples/s); summary in {out_dir / 'summary.json'}")
    return summary
