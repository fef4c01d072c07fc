"""The one error type users see: a message that names the problem and the fix.

It is a plain exception, so the stages (and Python callers) do not depend on click; the CLI
prints it on one line and exits with code 2. A bad setting raises `InvalidSetting`, whose
message names the setting the way the caller spelt it: `top_k` from Python, `--top-k` from the
command line.
"""


class UserError(Exception):
    """Bad input or a state the user must resolve."""

    def __str__(self) -> str:
        return " ".join(super().__str__().split())


class InvalidSetting(UserError):
    """A bad setting; `template` holds the literal text `{name}` where the setting is named."""

    def __init__(self, setting: str, template: str):
        super().__init__(template.replace("{name}", setting))
        self.setting, self.template = setting, template

    def named(self, name: str) -> str:
        return " ".join(self.template.replace("{name}", name).split())
