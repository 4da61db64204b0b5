"""What the user typed on the command line, and the error for when it is wrong."""


class UsageError(Exception):
    """Printed as `lmspec VERB: error: ...`, exit 2."""


def cli_overrides(pairs: list[str]) -> dict:
    """The `--set NAME=VALUE` options as a dict of hyper-parameters."""
    from lmspec.compiler import parse_overrides
    try:
        return parse_overrides(pairs)
    except ValueError as err:
        raise UsageError(str(err)) from None
