"""The one exception selection raises for bad input, so callers can catch it apart from bugs."""


class SelectionError(ValueError):
    """Bad input to a selection strategy; the message names the problem and the fix."""
