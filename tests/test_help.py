"""Every script's --help at 100 columns: each flag's help in at most two lines, its default
stated once, and shown wherever it is not None. Each script runs in this process (its parser
is caught as it prints the help), so the check is fast and covers any script added later."""

import argparse
import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = 100
MAX_HELP_LINES = 2
DEFAULT_STATED = re.compile(r"\(default\b|\bdefault:")   # "(default: X)", "; default: X"


def scripts() -> list[str]:
    """The repository's scripts: each .py file at the top, in misc/ or in bench/ that runs as
    __main__."""
    found = [*ROOT.glob("*.py"), *ROOT.glob("misc/*.py"), *ROOT.glob("bench/**/*.py")]
    return sorted(str(p.relative_to(ROOT)) for p in found
                  if 'if __name__ == "__main__":' in p.read_text())


def parser_of(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser `script --help` prints, caught as it prints (the script exits there)."""
    caught = []
    monkeypatch.setattr(argparse.ArgumentParser, "print_help",
                        lambda self, file=None: caught.append(self))
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))    # a script may put its folder first
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert stop.value.code in (0, None), f"{script} --help exited with {stop.value.code}"
    assert caught, f"{script} --help printed no parser's help"
    return caught[-1]


def help_blocks(text: str) -> dict[str, list[str]]:
    """{invocation's first word: the lines of its help text} from argparse's help output (an
    entry starts at an indent of two; the help starts after the invocation, on its line or the
    next)."""
    blocks, current = {}, None
    for line in text.splitlines():
        if re.match(r"  \S", line):
            invocation, *rest = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            current = blocks.setdefault(invocation.split()[0].rstrip(","), [])
            current.extend(rest)
        elif current is not None and line.startswith("   "):
            current.append(line.strip())
        else:
            current = None
    return blocks


def shows_default(action: argparse.Action, text: str) -> bool:
    """Whether `text` states the action's default: as written, as a list's items, "all" for
    every choice, a path within the repository from its root, a number in any notation."""
    default = action.default
    forms = {str(default)}
    if isinstance(default, (list, tuple)):
        forms.add(" ".join(map(str, default)))
        if action.choices is not None and set(default) == set(action.choices):
            forms.add("all")
    if isinstance(default, Path) and default.is_relative_to(ROOT):
        forms.add(str(default.relative_to(ROOT)))
    unwrapped = re.sub(r"\s", "", text)     # argparse may wrap a path after a hyphen
    if any(re.sub(r"\s", "", form) in unwrapped for form in forms):
        return True
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        numbers = re.findall(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?|inf", text)
        return any(float(number) == default for number in numbers)
    return False


def help_problems(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """Each flag whose help is longer than two lines, states a default more than once, or
    leaves out a default that is not None."""
    blocks = help_blocks(text)
    problems = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.metavar or action.dest
        lines = blocks.get(name)
        if lines is None:
            problems.append(f"{name}: not in --help")
            continue
        joined = " ".join(lines)
        if len(lines) > MAX_HELP_LINES:
            problems.append(f"{name}: {len(lines)} lines of help")
        if len(DEFAULT_STATED.findall(joined)) > 1:
            problems.append(f"{name}: states its default more than once: {joined}")
        default = action.default
        if default is not None and default != argparse.SUPPRESS and not shows_default(action,
                                                                                     joined):
            problems.append(f"{name}: its default {default!r} is not shown: {joined}")
    return problems


@pytest.mark.parametrize("script", scripts())
def test_every_flags_help_is_short_and_states_its_default_once(script, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(COLUMNS))
    parser = parser_of(script, monkeypatch)
    problems = help_problems(parser, parser.format_help())
    assert not problems, f"{script}:\n" + "\n".join(problems)


def test_the_check_sees_a_long_help_a_repeated_default_and_a_missing_one(monkeypatch):
    """The check itself, on a plain argparse parser that appends no defaults."""
    monkeypatch.setenv("COLUMNS", str(COLUMNS))
    parser = argparse.ArgumentParser()
    parser.add_argument("--long", default=1, help="word " * 60 + "(default: 1)")
    parser.add_argument("--twice", default="x", help="a flag (default: x) (default: x)")
    parser.add_argument("--missing", default=3, help="a flag")
    parser.add_argument("--fine", default=0.001, help="a rate (default: 1e-3)")
    problems = help_problems(parser, parser.format_help())
    assert [p.split(":")[0] for p in problems] == ["--long", "--twice", "--missing"], problems


@pytest.mark.parametrize("script", ["lm.py", "bench/lm.py", "bench/rnn.py",
                                    "bench/probes/rnn_edge_cosine.py"])
def test_usage_names_the_script_by_its_path(script, monkeypatch):
    """bench/lm.py's usage must not read as lm.py's."""
    assert parser_of(script, monkeypatch).prog == script
