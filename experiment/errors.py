"""The exceptions a script reports in one line: a user's mistake (`error: ...`, exit 2) and a
signal that stopped training (exit 128 + its number)."""

USER_ERROR_EXIT = 2
"""Exit status of a run stopped by a user's mistake or the environment, as argparse's."""


class UserError(Exception):
    """A problem the user can fix (a bad flag, a corrupt file); printed as `error: ...`."""


class RunInterrupted(Exception):
    """A signal stopped training after a step; the checkpoint to resume from is saved."""

    def __init__(self, signum: int, checkpoint, epoch: int | None, step: int):
        import signal

        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        where = f" in epoch {epoch}" if epoch is not None else ""
        super().__init__(f"stopped by {name}{where} after step {step}; checkpoint "
                         f"saved to {checkpoint}; continue with --resume {checkpoint.parent}")
