"""The one exception type a user sees: the CLI prints its message on one line and exits with status 2."""


class EdgeqError(Exception):
    """A problem with the user's input (path, model, option, data), not a bug in edgeq."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (or its type's name when it has none), for
    errors from other libraries whose messages run over several lines."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
