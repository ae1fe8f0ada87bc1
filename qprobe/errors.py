"""The one exception family the CLI turns into a one-line message and a non-zero exit."""


class QProbeError(Exception):
    """Bad input or a missing resource, described in one line that names the file or field."""
