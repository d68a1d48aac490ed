"""The one exception type that scripts report as a single `error:` line."""


class UserError(Exception):
    """A problem the user can fix (a bad flag, a corrupt file); printed as `error: ...`."""
