"""The figures draw whatever a run folder holds: runs shorter than one log interval, series
all zero or all NaN, a backprop run alone, a run stopped in its first epoch, runs of
different lengths; what has nothing to draw is noted on the figure. (A folder that is not a
run, or a cut-off metrics.csv, is in test_bad_input.py.)"""

import csv
import shutil
import struct

import pytest

from experiment.figures import FIGURES, draw_figures, draw_length_curves, load_run

SHORT = ["--epochs", "2", "--train-size", "6000", "--device", "cpu"]


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory, run_script):
    """The README's figure commands: a DNI and a backprop run of 24 steps an epoch, fewer than one
    --log-every interval (50)."""
    root = tmp_path_factory.mktemp("short")
    for name, script in (("A", "main.py"), ("B", "mlp.py")):
        result = run_script(script, *SHORT, "--out", root / name)
        assert result.returncode == 0, result.stderr
    return root


def edit_metrics(run, change):
    """Rewrite a run's metrics.csv rows through `change(row) -> row or None (dropped)`."""
    path = run / "metrics.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(r for r in map(change, rows) if r is not None)


def copy_run(short_runs, name, target):
    shutil.copytree(short_runs / name, target)
    return target


def notes_of(written, name):
    return next(notes for path, notes in written.items() if path.name == name)


def test_the_issues_commands_draw_four_figures(short_runs, run_script, tmp_path):
    result = run_script("misc/plot.py", short_runs / "A", short_runs / "B", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(FIGURES)
    assert png_size(tmp_path / "classify_loss.png") == (700, 450)
    assert png_size(tmp_path / "test_acc.png") == (1100, 450)


def test_a_run_shorter_than_one_interval_draws_its_epoch_rows(short_runs, tmp_path):
    run = load_run(short_runs / "A")
    assert [r["step"] for r in run.steps] == [0]           # only step 0 was logged
    written = draw_figures([short_runs / "A"], tmp_path)
    assert all(notes == [] for notes in written.values()), written


def test_series_all_nan_or_all_zero_are_noted(short_runs, tmp_path):
    nan_run = copy_run(short_runs, "A", tmp_path / "nan")
    edit_metrics(nan_run, lambda r: {k: ("nan" if k.startswith(("sg_loss", "cos")) else v)
                                     for k, v in r.items()})
    zero_run = copy_run(short_runs, "A", tmp_path / "zero")
    edit_metrics(zero_run, lambda r: {k: ("0.0" if k.startswith("sg_loss") else v)
                                      for k, v in r.items()})
    written = draw_figures([nan_run, zero_run], tmp_path / "F")
    grad_loss = notes_of(written, "grad_loss.png")
    assert any("interface 1: nothing recorded above 0" in n for n in grad_loss), grad_loss
    assert len(grad_loss) == 6                              # 3 interfaces, 2 runs
    cosine = notes_of(written, "grad_cosine.png")
    assert len(cosine) == 3 and all("(nan)" in n for n in cosine), cosine


def test_a_backprop_run_alone(short_runs, tmp_path):
    written = draw_figures([short_runs / "B"], tmp_path)
    assert notes_of(written, "grad_loss.png") == ["no DNI run among these"]
    assert notes_of(written, "classify_loss.png") == []


def test_a_run_stopped_in_its_first_epoch_and_runs_of_different_lengths(short_runs, tmp_path):
    stopped = copy_run(short_runs, "A", tmp_path / "stopped")
    edit_metrics(stopped, lambda r: r if r["kind"] == "step" else None)
    written = draw_figures([stopped, short_runs / "B"], tmp_path / "F")
    assert notes_of(written, "test_acc.png") == ["DNI mlp: no epoch finished"]
    assert notes_of(written, "classify_loss.png") == []    # its one step row is drawn
    one_epoch = copy_run(short_runs, "B", tmp_path / "one")
    edit_metrics(one_epoch, lambda r: None if r["epoch"] == "2" else r)
    written = draw_figures([short_runs / "A", one_epoch], tmp_path / "G")
    assert all(notes == [] for path, notes in written.items() if path.name != "grad_loss.png")


def test_length_figure_notes_a_run_without_levels(short_runs, run_script, tmp_path):
    result = run_script("rnn_tasks.py", "--steps", "4", "--batch-size", "4", "--hidden", "8",
                        "--device", "cpu", "--log-every", "2", "--out", tmp_path / "R")
    assert result.returncode == 0, result.stderr
    path = draw_length_curves([tmp_path / "R", short_runs / "A"], tmp_path / "len.png")
    assert png_size(path) == (800, 500)
