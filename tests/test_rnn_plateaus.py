"""bench/probes/rnn_plateaus.py: the plateaus of a curriculum and the cosine on them, from
records it is given."""

import json

import pytest

from bench.probes.rnn_plateaus import first_crossing_length, plateaus
from tests.conftest import run_python

PROBE = "bench/probes/rnn_plateaus.py"


def test_a_plateau_is_a_long_gap_between_growths_with_the_cosine_on_it_and_before_it_grew():
    levels = [[10, 2], [20_000, 3], [21_000, 4], [40_000, 5]]
    cosines = [(step, 0.1 if step < 15_000 else 0.3) for step in range(100, 20_000, 100)]
    cosines += [(20_000, 9.0)]                  # logged at the growth: the next length's
    cosines += [(step, 0.2 if step < 35_000 else 0.05) for step in range(21_100, 40_000, 100)]
    found = plateaus(levels, cosines, min_steps=10_000, before=5_000)
    assert [f[:3] for f in found] == [(2, 10, 20_000), (4, 21_000, 40_000)]  # 1,000: too short
    assert found[0][3] == pytest.approx(0.1) and found[0][4] == pytest.approx(0.3)
    assert found[1][3] == pytest.approx(0.2) and found[1][4] == pytest.approx(0.05)
    # the first SETTLE steps after a growth are not the plateau's
    assert plateaus([[0, 2], [12_000, 3]], [(500, 9.0), (2_000, 0.1), (8_000, 0.2)],
                    10_000, 5_000)[0][3:] == (0.1, 0.2)
    assert plateaus(levels, [], 10_000, 5_000) == []          # nothing logged: no plateau


@pytest.mark.parametrize("task, truncation, length", [
    ("copy", 5, 3), ("copy", 8, 4), ("copy", 2, 1), ("repeat_copy", 5, 2),
    ("repeat_copy", 8, 3), ("copy", 0, None)])
def test_the_first_crossing_is_the_shortest_length_longer_than_a_chunk(task, truncation,
                                                                        length):
    assert first_crossing_length(task, truncation, {}) == length    # copy: 2N + 1 steps


def write_run(folder, method, levels, cosines, truncation=5, window=0):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(
        {"task": "copy", "method": method, "truncation": truncation, "levels": levels}))
    (folder / "config.json").write_text(json.dumps(
        {"args": {"bits": 8, "max_length": 64, "synth_input_window": window}}))
    rows = ["kind,step,level,sg_cos"] + [f"step,{s},0,{c}" for s, c in cosines]
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_the_probe_reports_each_plateau_and_each_kind(tmp_path):
    climb = [(step, 0.1 if step < 25_000 else 0.2) for step in range(100, 30_000, 100)]
    write_run(tmp_path / "copy-dni-T5-s0", "dni", [[50, 3], [30_000, 4]], climb)
    later = [(step, 0.2 if step < 45_000 else 0.1) for step in range(30_100, 50_000, 100)]
    write_run(tmp_path / "copy-dni-T5-s1", "dni", [[50, 3], [30_000, 4], [50_000, 5]],
              climb + later)
    write_run(tmp_path / "copy-bptt-T5-s0", "bptt", [[50, 3], [30_000, 4]], climb)
    write_run(tmp_path / "copy-dni_inputs-T5-s0", "dni", [[50, 3], [30_000, 4]], climb,
              window=16)
    out = run_python(PROBE, tmp_path, check=True).stdout
    assert "| copy-dni-T5-s0 | 3 (first crossing) | 50 to 30,000 | 0.100 | 0.200 |" in out
    assert "| copy-dni-T5-s1 | 4 | 30,000 to 50,000 | 0.200 | 0.100 |" in out
    assert "bptt" not in out and "inputs" not in out       # the paper's S only
    assert "first crossing: plateaus 2," in out and "0.01 or more in 2, fell by as much in 0" in out
    assert "later: plateaus 1," in out and "0.01 or more in 0, fell by as much in 1" in out


@pytest.mark.parametrize("folder, flags, says", [
    ("", [], "error: no finished run"),
    ("missing", [], "missing: not a folder"),
    ("", ["--min-steps", "6000"], "--min-steps must be more than --before + 1000"),
])
def test_the_probe_says_in_one_line_when_there_is_nothing_to_read(tmp_path, folder, flags,
                                                                   says):
    done = run_python(PROBE, tmp_path / folder, *flags)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_probe_names_a_run_it_cannot_read(tmp_path):
    write_run(tmp_path / "copy-dni-T5-s0", "dni", [[50, 3], [30_000, 4]], [(100, 0.1)])
    (tmp_path / "copy-dni-T5-s0" / "metrics.csv").write_text("kind,step,level,sg_cos\nstep,x,0,1\n")
    done = run_python(PROBE, tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: ") and "metrics.csv is damaged at line 2" in done.stderr
