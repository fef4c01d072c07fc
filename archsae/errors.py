"""The one error type users see: a one-line message that names the problem and the fix."""

import click


class UserError(click.ClickException):
    """Bad input or a state the user must resolve. The CLI prints it on one line, exit code 2."""

    exit_code = 2

    def format_message(self) -> str:
        return " ".join(str(self.message).split())
