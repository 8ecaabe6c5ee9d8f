"""The one public exception: what failed, the offending value, what to do next."""


class EdgeqError(Exception):
    """A user-facing failure. The message is one line and says what to do."""
