"""The one exception family the CLI turns into a one-line message and a non-zero exit."""


class QProbeError(Exception):
    """Bad input or a missing resource, described in one line that names the file or field."""


def describe(exc: BaseException) -> str:
    """One line for ``exc``: a :class:`QProbeError`'s own message, else its type and first line (a bug
    caught where one bad item must not end a batch, shown as what it is)."""
    lines = str(exc).splitlines()
    if isinstance(exc, QProbeError):
        return lines[0] if lines else type(exc).__name__
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
