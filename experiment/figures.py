"""The seed's figures from run folders: classification loss, each interface's synthetic-gradient
loss (log scale), its cosine to the true gradient, and test accuracy against epoch and wall
time, every run labelled by its method and model."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from experiment.errors import UserError

FIGURES = ("classify_loss.png", "grad_loss.png", "grad_cosine.png", "test_acc.png")


@dataclass
class Run:
    """One run folder's label and metric rows."""

    label: str
    steps: list[dict[str, float]]
    epochs: list[dict[str, float]]
    interfaces: int


def _label(run_dir: Path) -> str:
    """'DNI mlp', 'cDNI cnn', 'backprop mlp', ... from the run's config.json."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        args = config["args"]
    except (OSError, ValueError, KeyError):
        return run_dir.name
    script = Path(config.get("script", "")).name
    if script == "main.py":
        method = "cDNI" if args.get("conditioned") else "DNI"
        model = args.get("model_type", "")
    else:
        method, model = "backprop", script.removesuffix(".py")
    return f"{method} {model}".strip()


def load_run(run_dir: str | Path) -> Run:
    """Read a run folder's metrics.csv (and config.json for its label)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.csv"
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        raise UserError(f"{run_dir} has no readable metrics.csv (not a run folder?)") from None

    def numbers(row):
        return {k: float(v) for k, v in row.items() if k != "kind" and v not in ("", None)}

    steps = [numbers(r) for r in rows if r.get("kind") == "step"]
    epochs = [numbers(r) for r in rows if r.get("kind") == "epoch"]
    columns = rows[0].keys() if rows else []
    interfaces = sum(1 for c in columns if c.startswith("sg_loss"))
    return Run(_label(run_dir), steps, epochs, interfaces)


def _series(rows, x, y):
    points = [(r[x], r[y]) for r in rows if x in r and y in r]
    return [p[0] for p in points], [p[1] for p in points]


def draw_figures(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write the four figures for these runs into out_dir; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    runs = [load_run(d) for d in run_dirs]
    labels = [r.label for r in runs]
    if len(set(labels)) < len(labels):  # same method and model twice: tell them apart
        labels = [f"{r.label} ({Path(d).name})" for r, d in zip(runs, run_dirs)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sns.set_theme(style="whitegrid", context="notebook")
    palette = sns.color_palette("tab10")
    written = []

    def save(fig, name):
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (run, label) in enumerate(zip(runs, labels)):
        ax.plot(*_series(run.steps, "step", "train_loss"), label=label, color=palette[i % 10])
    ax.set(title="Classification loss (training)", xlabel="training step",
           ylabel="cross-entropy (nats)", yscale="log")
    ax.legend()
    save(fig, "classify_loss.png")

    for name, column, title, ylabel, log in (
            ("grad_loss.png", "sg_loss", "Synthetic-gradient loss per interface",
             "squared error of the per-example gradient", True),
            ("grad_cosine.png", "cos", "Cosine of synthetic to true gradient per interface",
             "cosine similarity", False)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        styles = ["-", "--", ":", "-."]
        for r, (run, label) in enumerate(zip(runs, labels)):
            for i in range(1, run.interfaces + 1):
                xs, ys = _series(run.steps, "step", f"{column}{i}")
                if log:
                    xs, ys = zip(*[(x, y) for x, y in zip(xs, ys) if y > 0]) or ([], [])
                ax.plot(xs, ys, styles[r % 4], color=palette[(i - 1) % 10],
                        label=f"{label}, interface {i}")
        if not any(run.interfaces for run in runs):
            ax.text(0.5, 0.5, "no DNI run among these", ha="center", transform=ax.transAxes)
        ax.set(title=title, xlabel="training step", ylabel=ylabel)
        if log and any(run.interfaces for run in runs):
            ax.set_yscale("log")
        if any(run.interfaces for run in runs):
            ax.legend(fontsize="small")
        save(fig, name)

    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for i, (run, label) in enumerate(zip(runs, labels)):
        acc = [100 * r["test_acc"] for r in run.epochs]
        by_epoch.plot([r["epoch"] for r in run.epochs], acc, "o-", label=label,
                      color=palette[i % 10])
        by_time.plot([r["wall_seconds"] for r in run.epochs], acc, "o-", label=label,
                     color=palette[i % 10])
    by_epoch.set(title="Test accuracy by epoch", xlabel="epoch", ylabel="test accuracy (%)")
    by_time.set(title="Test accuracy by training time", xlabel="wall time (s)")
    by_epoch.legend()
    save(fig, "test_acc.png")
    return written


def _rnn_label(run_dir: Path) -> str:
    """'copy DNI T=3 seed 0' from an rnn_tasks.py run's config.json."""
    try:
        args = json.loads((run_dir / "config.json").read_text())["args"]
    except (OSError, ValueError, KeyError):
        return run_dir.name
    method = {"bptt": "BPTT", "dni": "DNI", "dni_aux": "DNI+Aux"}.get(args.get("method"), "?")
    return f"{args.get('task')} {method} T={args.get('truncation')} seed {args.get('seed')}"


def draw_length_curves(run_dirs: list[str | Path], out_path: str | Path) -> Path:
    """One figure of the curriculum length reached against training step for several
    rnn_tasks.py runs (their metrics.csv `level` column); return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    palette = sns.color_palette("tab10")
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run_dir in enumerate(map(Path, run_dirs)):
        steps = load_run(run_dir).steps
        xs, ys = _series(steps, "step", "level")
        style = ("-", "--", ":", "-.")[(i // 10) % 4]
        ax.plot(xs, ys, style, drawstyle="steps-post", color=palette[i % 10],
                label=_rnn_label(run_dir))
    ax.set(title="Sequence length reached (curriculum)", xlabel="training step",
           ylabel="length N")
    ax.legend(fontsize="small")
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
