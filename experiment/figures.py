"""The seed's figures from run folders: classification loss, each interface's synthetic-gradient
loss (log scale), its cosine to the true gradient, and test accuracy against epoch and wall
time, every run labelled by its method and model."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from experiment.errors import UserError
from experiment.records import BASE_COLUMNS, written_whole

FIGURES = ("classify_loss.png", "grad_loss.png", "grad_cosine.png", "test_acc.png")


@dataclass
class Run:
    """One run folder's label, metric columns and rows (finite figures only)."""

    label: str
    columns: list[str]
    steps: list[dict[str, float]]
    epochs: list[dict[str, float]]

    @property
    def interfaces(self) -> int:
        """How many interfaces the run recorded figures for (0: a backprop run)."""
        return sum(1 for c in self.columns if c.startswith("sg_loss"))


def _label(run_dir: Path) -> str:
    """'DNI mlp', 'cDNI cnn', 'backprop mlp', 'DNI mlp (2-stage pipeline)', ... from the run's
    config.json (the folder's name without one)."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        args = config["args"]
        script = Path(config.get("script", "")).name
        processes = int(config.get("world_size", 1))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return run_dir.name
    if script == "main.py":
        method = "cDNI" if args.get("conditioned") else "DNI"
        model = args.get("model_type", "")
    else:
        method, model = "backprop", script.removesuffix(".py")
    label = f"{method} {model}".strip()
    return f"{label} ({processes}-stage pipeline)" if processes > 1 else label


def load_run(run_dir: str | Path) -> Run:
    """Read a run folder's metrics.csv (and config.json for its label); a folder without one,
    or a metrics.csv that is cut off or damaged, is a UserError naming the file."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.csv"
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {run_dir} is not a run folder (or its run "
                        "stopped before writing records)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} cannot be read ({getattr(exc, 'strerror', None) or exc})"
                        ) from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or rows[0][:2] != BASE_COLUMNS[:2]:
        raise UserError(f"{path} is not a run's metrics.csv (its header is not "
                        f"{','.join(BASE_COLUMNS[:2])},...)")
    if not text.endswith("\n"):
        raise UserError(f"{path} is cut off: its last line is incomplete")
    columns = rows[0]
    steps, epochs = [], []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(columns) or row[0] not in ("step", "epoch"):
            raise UserError(f"{path} is damaged at line {number}")
        try:
            values = {c: float(v) for c, v in zip(columns[1:], row[1:]) if v != ""}
        except ValueError:
            raise UserError(f"{path} is damaged at line {number} (a figure is not a number)"
                            ) from None
        finite = {c: v for c, v in values.items() if math.isfinite(v)}
        (steps if row[0] == "step" else epochs).append(finite)
    return Run(_label(run_dir), columns, steps, epochs)


def _series(rows: list[dict], x: str, y: str, positive: bool = False
            ) -> tuple[list[float], list[float]]:
    """The (x, y) points of the rows that hold both (and y > 0 if `positive`)."""
    points = [(r[x], r[y]) for r in rows if x in r and y in r and (r[y] > 0 or not positive)]
    return [p[0] for p in points], [p[1] for p in points]


def _run_series(run: Run, column: str, positive: bool = False
                ) -> tuple[list[float], list[float]]:
    """A run's figure against training step: its step rows, or its epoch rows where the step
    rows hold fewer than two points (a run shorter than one --log-every interval)."""
    xs, ys = _series(run.steps, "step", column, positive)
    if len(xs) < 2:
        by_epoch = _series(run.epochs, "step", column, positive)
        if len(by_epoch[0]) > len(xs):
            return by_epoch
    return xs, ys


def _plot(ax, xs, ys, *args, **kwargs) -> None:
    """A line, with markers where the points are few enough to see (one point alone)."""
    ax.plot(xs, ys, *args, marker="o" if len(xs) <= 30 else None, markersize=4, **kwargs)


def _note(ax, notes: list[str], drew: bool) -> None:
    """Say on the figure what had nothing to draw: in the middle of an empty plot, else in a
    corner."""
    if not notes:
        return
    text = "\n".join(notes[:8] + ([f"... and {len(notes) - 8} more"] if len(notes) > 8 else []))
    if drew:
        ax.text(0.02, 0.02, text, ha="left", va="bottom", fontsize="x-small", color="0.3",
                transform=ax.transAxes)
    else:
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])


def save_figure(fig, path: Path) -> Path:
    """Write a figure as PNG atomically (temporary file, rename) and close it; a folder that
    cannot be written is a UserError naming the file."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
        with written_whole(tmp, path):  # a failure or Ctrl-C leaves no temporary behind
            fig.savefig(tmp, dpi=100)
            os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path


def draw_figures(run_dirs: list[str | Path], out_dir: str | Path) -> dict[Path, list[str]]:
    """Write the four figures for these runs into out_dir; return each one's path with the
    notes written on it: whatever had nothing to draw (a series never measured, all NaN or
    not positive on a log scale, no finished epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    runs = [load_run(d) for d in run_dirs]
    labels = [r.label for r in runs]
    if len(set(labels)) < len(labels):  # same method and model twice: tell them apart
        labels = [f"{r.label} ({Path(d).name})" for r, d in zip(runs, run_dirs)]
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write figures to {out_dir}: {exc.strerror or exc}") from None
    sns.set_theme(style="whitegrid", context="notebook")
    palette = sns.color_palette("tab10")
    written = {}

    def save(fig, name, notes):
        written[save_figure(fig, out_dir / name)] = list(notes)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    notes = []
    for i, (run, label) in enumerate(zip(runs, labels)):
        xs, ys = _run_series(run, "train_loss", positive=True)
        if xs:
            _plot(ax, xs, ys, label=label, color=palette[i % 10])
        else:
            notes.append(f"{label}: no training loss recorded")
    drew = len(notes) < len(runs)
    ax.set(title="Classification loss (training)", xlabel="training step",
           ylabel="cross-entropy (nats)")
    if drew:
        ax.set_yscale("log")
        ax.legend()
    _note(ax, notes, drew)
    save(fig, "classify_loss.png", notes)

    for name, column, title, ylabel, log in (
            ("grad_loss.png", "sg_loss", "Synthetic-gradient loss per interface",
             "squared error of the per-example gradient", True),
            ("grad_cosine.png", "cos", "Cosine of synthetic to true gradient per interface",
             "cosine similarity", False)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        styles = ["-", "--", ":", "-."]
        notes, drew = [], False
        for r, (run, label) in enumerate(zip(runs, labels)):
            for i in range(1, run.interfaces + 1):
                if f"{column}{i}" not in run.columns:
                    notes.append(f"{label}: not measured in this run")
                    break
                xs, ys = _run_series(run, f"{column}{i}", positive=log)
                if not xs:
                    notes.append(f"{label}, interface {i}: nothing recorded"
                                 + (" above 0" if log else ""))
                    continue
                _plot(ax, xs, ys, styles[r % 4], color=palette[(i - 1) % 10],
                      label=f"{label}, interface {i}")
                drew = True
        if not any(run.interfaces for run in runs):
            notes.append("no DNI run among these")
        ax.set(title=title, xlabel="training step", ylabel=ylabel)
        if drew:
            if log:
                ax.set_yscale("log")
            ax.legend(fontsize="small")
        _note(ax, notes, drew)
        save(fig, name, notes)

    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    notes = []
    for i, (run, label) in enumerate(zip(runs, labels)):
        finished = [r for r in run.epochs if "test_acc" in r]
        if not finished:
            notes.append(f"{label}: no epoch finished")
            continue
        acc = [100 * r["test_acc"] for r in finished]
        by_epoch.plot([r["epoch"] for r in finished], acc, "o-", label=label,
                      color=palette[i % 10])
        by_time.plot([r.get("wall_seconds", math.nan) for r in finished], acc, "o-",
                     label=label, color=palette[i % 10])
    drew = len(notes) < len(runs)
    by_epoch.set(title="Test accuracy by epoch", xlabel="epoch", ylabel="test accuracy (%)")
    by_time.set(title="Test accuracy by training time", xlabel="wall time (s)")
    if drew:
        by_epoch.legend()
    _note(by_epoch, notes, drew)
    save(fig, "test_acc.png", notes)
    return written


def _rnn_label(run_dir: Path) -> str:
    """'copy DNI T=3 seed 0' from an rnn_tasks.py run's config.json."""
    try:
        args = json.loads((run_dir / "config.json").read_text())["args"]
    except (OSError, ValueError, KeyError, TypeError):
        return run_dir.name
    if not isinstance(args, dict) or "task" not in args:
        return run_dir.name
    method = {"bptt": "BPTT", "dni": "DNI", "dni_aux": "DNI+Aux"}.get(args.get("method"), "?")
    window = args.get("synth_input_window")
    variant = f", S sees {window} inputs" if window else ""
    return (f"{args.get('task')} {method}{variant} T={args.get('truncation')} "
            f"seed {args.get('seed')}")


def draw_length_curves(run_dirs: list[str | Path], out_path: str | Path) -> Path:
    """One figure of the curriculum length reached against training step for several
    rnn_tasks.py runs (their metrics.csv `level` column); return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    palette = sns.color_palette("tab10")
    runs = [(load_run(run_dir), _rnn_label(Path(run_dir))) for run_dir in run_dirs]
    fig, ax = plt.subplots(figsize=(8, 5))
    notes = []
    for i, (run, label) in enumerate(runs):
        xs, ys = _series(run.steps, "step", "level")
        if not xs:
            notes.append(f"{label}: no curriculum length recorded")
            continue
        style = ("-", "--", ":", "-.")[(i // 10) % 4]
        ax.plot(xs, ys, style, drawstyle="steps-post", color=palette[i % 10], label=label,
                marker="o" if len(xs) <= 30 else None, markersize=4)
    drew = len(notes) < len(runs)
    ax.set(title="Sequence length reached (curriculum)", xlabel="training step",
           ylabel="length N")
    if drew:
        ax.legend(fontsize="small")
    _note(ax, notes, drew)
    return save_figure(fig, Path(out_path))


def load_edge_cosines(run_dir: str | Path) -> dict[tuple[bool, int], list[tuple[int, float]]]:
    """A probe run's edge_cosine.csv (bench/probes/rnn_edge_cosine.py) as {(longer, edge):
    [(step, cosine), ...]}, `longer` for the length after the curriculum's; a row repeated by
    a resume keeps its last value. A missing or damaged file is a UserError naming it."""
    path = Path(run_dir) / "edge_cosine.csv"
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        points: dict[tuple[bool, int], dict[int, float]] = {}
        for row in rows:
            step, level, length = int(row["step"]), int(row["level"]), int(row["length"])
            key = (length > level, int(row["edge"]))
            points.setdefault(key, {})[step] = float(row["cosine"])
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror or error})") from None
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: not a probe's edge_cosine.csv (damaged or cut off)") from None
    return {key: sorted(by_step.items()) for key, by_step in sorted(points.items())}


def _rolling_mean(values: list[float], width: int) -> list[float]:
    """The mean of each value and up to width - 1 before it."""
    return [sum(values[max(0, i - width + 1):i + 1]) / (i + 1 - max(0, i - width + 1))
            for i in range(len(values))]


def draw_edge_cosines(run_dirs: list[str | Path], out_path: str | Path, smooth: int = 5
                      ) -> Path:
    """The synthetic gradient's cosine to the true one per chunk edge against step, a row of
    two panels per probe run (at the curriculum's length, and one longer), a rolling mean of
    `smooth` measurements; return the figure's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    palette = sns.color_palette("tab10")
    runs = [(load_edge_cosines(d), _rnn_label(Path(d))) for d in run_dirs]
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.2 * len(runs)), squeeze=False,
                             sharey=True)
    for (curves, label), row in zip(runs, axes):
        for longer, ax in zip((False, True), row):
            edges = sorted(edge for (lng, edge) in curves if lng == longer)
            for edge in edges:
                steps, cosines = zip(*curves[(longer, edge)])
                ax.plot(steps, _rolling_mean(list(cosines), smooth), lw=1.2,
                        color=palette[(edge - 1) % 10], label=f"edge {edge}")
            ax.axhline(0, color="grey", lw=0.8)
            where = "one longer than the curriculum's" if longer else "the curriculum's length"
            ax.set(title=f"{label}: {where}", xlabel="training step", ylabel="cosine")
            ax.title.set_fontsize("small")
            if edges:
                ax.legend(fontsize="x-small", ncol=2)
            else:
                _note(ax, ["no chunk edge at this length"], False)
    return save_figure(fig, Path(out_path))


def draw_bpc_curves(panels: dict[str, list[tuple[str, str | Path]]], out_path: str | Path
                    ) -> Path:
    """Validation bits per character against training step of lm.py runs, one panel per key
    of `panels` (e.g. "T = 5"), each a list of (label, run folder); runs of one label share
    a colour. Return the figure's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    labels = sorted({label for runs in panels.values() for label, _ in runs})
    colour = dict(zip(labels, sns.color_palette("tab10")))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), sharey=True,
                             squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels.items()):
        notes, shown = [], set()
        for label, run_dir in runs:
            try:
                xs, ys = _series(load_run(run_dir).steps, "step", "valid_bpc")
            except UserError:
                xs = []
            if not xs:
                notes.append(f"{label}: nothing yet")
                continue
            ax.plot(xs, ys, color=colour[label], alpha=0.8,
                    label=None if label in shown else label)
            shown.add(label)
        ax.set(title=title, xlabel="training step")
        _note(ax, notes, bool(shown))
        if shown:
            ax.legend(fontsize="small")
    axes[0][0].set_ylabel("validation bits per character")
    return save_figure(fig, Path(out_path))


def draw_time_curves(curves: dict[str, list[tuple[float, float]]], out_path: str | Path,
                     target: float | None = None, title: str = "") -> Path:
    """Validation bits per character against training seconds, one line per key of `curves`
    (a row's (seconds, BPC) points; an empty list is named on the figure), and the `target`
    BPC as a dashed line. Return the figure's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = sns.color_palette("tab10", max(len(curves), 1))
    notes, drew = [], False
    for colour, (label, points) in zip(colours, curves.items()):
        if not points:
            notes.append(f"{label}: no validation")
            continue
        xs, ys = zip(*points)
        _plot(ax, xs, ys, color=colour, alpha=0.85, label=label)
        drew = True
    if target is not None and drew:
        ax.axhline(target, color="0.4", linestyle="--", linewidth=1,
                   label=f"target {target:.3f}")
    ax.set(title=title, xlabel="training seconds (evaluation excluded)",
           ylabel="validation bits per character")
    if drew:
        ax.legend(fontsize="small")
    _note(ax, notes, drew)
    return save_figure(fig, Path(out_path))
