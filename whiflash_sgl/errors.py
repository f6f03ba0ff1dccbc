"""The one exception type for bad input: the CLI prints its message (which names the problem and the fix)."""


class WhiFlashError(Exception):
    """A user-facing error: bad input, a missing file or package, a mismatched model."""
