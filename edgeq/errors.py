"""The one exception type a user sees: the CLI prints its message on one line and exits with status 2."""


class EdgeqError(Exception):
    """A problem with the user's input (path, model, option, data), not a bug in edgeq."""
