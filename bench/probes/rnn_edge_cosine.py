"""An rnn_tasks.py run (same flags, same records) that also measures, every --log-every steps,
the synthetic gradient at each chunk edge against the true gradient of the future there: the
cosine and the norm ratio per edge, on fresh batches at the curriculum's length and one longer
(the length being learned).

Usage: OMP_NUM_THREADS=1 python bench/probes/rnn_edge_cosine.py --task copy --method dni
       --truncation 3 --steps 30000 --log-every 500 --threads 1 --out DIR [rnn_tasks.py's flags]
       python bench/probes/rnn_edge_cosine.py figure PNG DIR [DIR ...]   (draws, trains nothing)
Writes edge_cosine.csv in the run folder: step, level, length, edge, cosine, norm_ratio
(bench/README.md, "The recurrent settings"). "True" is what S is trained towards without its
own errors (each further edge discounted by --discount), as rnn_tasks.py's sg_cos.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch

from experiment.cli import Parser, run
from experiment.figures import draw_edge_cosines
from experiment.rnn_train import finish, make_loop, parse_args

FIELDS = ["step", "level", "length", "edge", "cosine", "norm_ratio"]
BATCHES = 4     # batches averaged per measurement: one batch's cosine is noisy


def edge_cosines(loop, level: int) -> list[tuple[int, float, float]]:
    """(edge, cosine, |synthetic| / |true|) at every inner chunk edge, means over BATCHES fresh
    batches at curriculum length `level`, drawn from a generator of their own so that the
    run's stream is unchanged."""
    generator = torch.Generator(device=loop.device).manual_seed(10_000 + loop.state.step)
    sums: dict[int, list[float]] = {}
    for _ in range(BATCHES):
        batch = loop.task.sample(level, loop.args.batch_size, generator, loop.device)
        pairs = loop.model.trainer.future_gradients(batch.inputs, loop.task.loss_of(batch))
        for edge, (synthetic, true) in enumerate(pairs, start=1):
            s, t = synthetic.flatten(), true.flatten()
            cosine = torch.nn.functional.cosine_similarity(s, t, dim=0).item()
            ratio = (s.norm() / t.norm()).item() if t.norm() > 0 else float("nan")
            kept = sums.setdefault(edge, [0.0, 0.0])
            kept[0] += cosine / BATCHES
            kept[1] += ratio / BATCHES
    return [(edge, c, r) for edge, (c, r) in sorted(sums.items())]


def main(argv: list[str] | None = None) -> None:
    """Train as rnn_tasks.py does, measuring the per-edge cosines every --log-every steps."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["figure"]:
        figure = Parser(description="Draw the per-edge cosines of probe runs, a row each.")
        figure.add_argument("png", help="the figure's file")
        figure.add_argument("runs", nargs="+", metavar="DIR", help="probe run folders")
        options = figure.parse_args(argv[1:])
        print(draw_edge_cosines(options.runs, options.png))
        return
    args = parse_args(argv)
    if args.method == "bptt":
        raise SystemExit("error: the probe needs a synthesizer: --method dni or dni_aux")
    if args.log_every <= 0:
        raise SystemExit("error: the probe measures every --log-every steps; give one above 0")
    loop = None

    def measure(step: int) -> None:
        if step % args.log_every and step != args.steps:
            return
        level = loop.curriculum.level
        with (loop.out_dir / "edge_cosine.csv").open("a", newline="") as f:
            writer = csv.writer(f)
            for length in (level, level + 1):
                for edge, cosine, ratio in edge_cosines(loop, length):
                    writer.writerow([step, level, length, edge, f"{cosine:.5f}", f"{ratio:.5f}"])

    loop = make_loop(args, measure)
    path = loop.out_dir / "edge_cosine.csv"
    if not path.exists():
        path.write_text(",".join(FIELDS) + "\n")
    loop.run()
    finish(loop)
    print(f"per-edge cosines in {path}")


if __name__ == "__main__":
    run(main)
