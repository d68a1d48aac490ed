"""The exceptions a script reports in one line: a user's mistake (`error: ...`, exit 2), a
signal that stopped training (exit 128 + its number), and a script a bench ran that did not
finish (its exit status)."""

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


class ScriptFailed(Exception):
    """A training script that a bench ran stopped before its end (its own message is above in
    the output): the bench exits with the script's status, 128 + the signal's number when a
    signal ended it; `started` False: a signal stopped the bench before the script began."""

    def __init__(self, command: list[str], status: int, out, started: bool = True):
        self.exit_code = status if status > 0 else 128 - status
        if not started:
            super().__init__(f"{command[0]} for {out} did not start: the bench was stopped "
                             f"(exit status {self.exit_code}); the same command starts it")
            return
        super().__init__(f"{command[0]} for {out} ended with exit status {self.exit_code} (its "
                         "message is above); the same command resumes it from its checkpoint, "
                         "if it saved one")
