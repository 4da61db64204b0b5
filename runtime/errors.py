"""The errors a user can cause, as the command line reports them."""


class UsageError(Exception):
    """Printed as `lmspec VERB: error: ...`, exit 2."""
