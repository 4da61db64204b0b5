"""The one base of every error a user of lmspec can cause: a wrong spec, a missing or unwritable file,
a bad option, a corrupt checkpoint. The command line catches it once and prints it as one located
line; anything else that reaches it is a bug in lmspec (as lark's exceptions share one base)."""


class UserError(Exception):
    """A mistake in what the user gave lmspec; the message says what and where."""
    exit_code = 1

    def report(self, verb: str) -> str:
        """The text the command line prints for it."""
        return f"lmspec {verb}: error: {self}"
