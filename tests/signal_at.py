"""Run a script with a signal delivered to itself at a chosen moment of its run, for the
interrupt tests: `python tests/signal_at.py MOMENT SIGNAL SCRIPT [ARGS ...]`.

MOMENT is NAME or NAME:N (the N-th time, 1 by default), NAME one of: step (the loss: in the
N-th cross-entropy computed, by a training step, a measurement or an evaluation; for
rnn_tasks.py and a pipeline stage, the N-th training step), evaluate (the test-set pass), checkpoint (a checkpoint write,
as it begins), checkpoint-write (inside the file write, with the signal a second, later one,
which stops at once), figures (the figures at the end), log (rnn_tasks.py's measured line).

The script starts with SIGINT and SIGTERM as a terminal's command has them, however this
driver was started.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def deliver_on_call(owner, name: str, nth: int, signum: int, before=None) -> None:
    """Replace owner.name by a wrapper that sends `signum` to this process on its nth call
    (after calling `before`), then goes on with the original."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth:
            if before is not None:
                before()
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def main() -> None:
    """Patch the moment, then run the script as __main__."""
    moment, signame, script, *argv = sys.argv[1:]
    # the signals' dispositions of a script started from a terminal, whatever this process
    # inherited: a shell's background job (`pytest &` in a script) starts with SIGINT ignored,
    # which Python keeps, so a SIGINT outside the training loop's own handler would do nothing
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    name, _, count = moment.partition(":")
    nth = int(count or 1)
    signum = getattr(signal, signame)
    import torch.nn.functional

    import experiment.figures
    import experiment.loop
    import experiment.pipeline_train
    import experiment.records
    import experiment.rnn_train
    import experiment.train

    if name == "step" and script == "rnn_tasks.py":
        import dni.recurrent
        deliver_on_call(dni.recurrent.TruncatedBPTT, "forward", nth, signum)
    elif name == "step" and "WORLD_SIZE" in os.environ:  # a pipeline stage's training step
        deliver_on_call(experiment.pipeline_train.PipelineStage, "train_step", nth, signum)
    elif name == "step":
        deliver_on_call(torch.nn.functional, "cross_entropy", nth, signum)
    elif name == "evaluate":
        deliver_on_call(experiment.train, "evaluate", nth, signum)
        deliver_on_call(experiment.pipeline_train, "evaluate_pipeline", nth, signum)
    elif name == "checkpoint":
        deliver_on_call(experiment.loop, "save_checkpoint", nth, signum)
    elif name == "checkpoint-write":
        # the first signal comes as the nth write begins, the second inside the file write
        deliver_on_call(experiment.loop, "save_checkpoint", nth, signum)
        experiment.loop.DUPLICATE_SIGNAL_SECONDS = -1.0  # the second counts as a second
        deliver_on_call(experiment.records.os, "fsync", nth, signum)
    elif name == "figures":
        deliver_on_call(experiment.figures, "draw_figures", nth, signum)
    elif name == "log":
        deliver_on_call(experiment.rnn_train, "future_gradient_cosine", nth, signum)
    else:
        raise SystemExit(f"unknown moment {moment}")
    sys.argv = [str(ROOT / script), *argv]
    runpy.run_path(str(ROOT / script), run_name="__main__")


if __name__ == "__main__":
    main()
