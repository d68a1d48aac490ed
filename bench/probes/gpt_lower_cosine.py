"""A GPT run of lm.py (same flags, same records) that also measures, every --eval-every steps,
how well the synthetic gradient teaches the lower half: the cosine between the gradient the
embedding and the blocks up to the top cut get from S and the true (backprop) one, over all of
their parameters and over their weight matrices alone, on the run's fixed probe batch.

Usage: OMP_NUM_THREADS=1 python bench/probes/gpt_lower_cosine.py --model gpt --method dni
       --steps 300 --eval-every 100 --threads 1 [lm.py's flags]
Prints one line per measurement and writes them to lower_cosine.csv in the run folder
(bench/README.md, "Synthetic gradients on a transformer").
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch

from experiment.cli import prepare_out_dir, resolve_device, run
from experiment.data import load_text
from experiment.lm_flags import parse_args
from experiment.lm_train import make_loop, token_loss, uses_synthesizer, write_summary
from experiment.records import write_config


def lower_gradient_cosines(loop) -> tuple[float, float]:
    """(cosine over all lower parameters, over their weight matrices) between the gradient S
    gives them and the true one, on the loop's probe batch; gradients are left cleared."""
    model, args = loop.model, loop.args
    lower = [p for p in model.net[:max(args.cuts) + 1].parameters() if p.requires_grad]
    inputs, targets = loop.probe[:, :-1], loop.probe[:, 1:]
    context = targets if args.conditioned else None
    loop.optimizer.zero_grad(set_to_none=True)
    model(inputs, context=context) if context is not None else model(inputs)  # S reaches them
    synthetic = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in lower]
    loop.optimizer.zero_grad(set_to_none=True)
    token_loss(model.net(inputs), targets).backward()      # the plain network: backprop
    true = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in lower]
    loop.optimizer.zero_grad(set_to_none=True)

    def cosine(keep) -> float:
        s = torch.cat([g.flatten() for g, p in zip(synthetic, lower) if keep(p)])
        t = torch.cat([g.flatten() for g, p in zip(true, lower) if keep(p)])
        return torch.nn.functional.cosine_similarity(s, t, dim=0).item()

    return cosine(lambda p: True), cosine(lambda p: p.dim() >= 2)


def main(argv: list[str] | None = None) -> None:
    """Train as lm.py does, measuring the lower cosine every --eval-every steps."""
    args = parse_args(argv)
    if args.model != "gpt" or not uses_synthesizer(args):
        raise SystemExit("error: the probe needs --model gpt --method dni")
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    text = load_text(args.corpus)
    out_dir = prepare_out_dir(args.out, "lm")
    write_config(out_dir, "lm.py", args, device)
    rows: list[dict] = []
    loop = None

    def measure(step: int) -> None:
        if step % args.eval_every == 0:
            every, weights = lower_gradient_cosines(loop)
            rows.append({"step": step, "lower_cos": every, "lower_weight_cos": weights})
            print(f"step {step}: lower cosine {every:+.3f}, weights only {weights:+.3f}",
                  flush=True)

    loop = make_loop(args, text, out_dir, device, on_step=measure)
    loop.run()
    write_summary(args, loop, text, out_dir, device)
    with open(out_dir / "lower_cosine.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "lower_cos", "lower_weight_cos"])
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    run(main)
