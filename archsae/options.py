"""Click options generated from the settings dataclasses (`archsae.fit.settings`): the help,
choices, range and default of each option are the field's own, written once there.

An option left out on the command line arrives as None, so the dataclass default applies;
`SettingsOptions.values` picks the given ones for the settings constructor, which checks them.
"""

from dataclasses import fields

import click

from archsae.fit.settings import describe_range


def flag_of(name: str) -> str:
    """The command-line spelling of a setting: `top_k` -> `--top-k`."""
    return "--" + name.replace("_", "-")


def _option(f):
    m = f.metadata
    flags = m["flags"].split(",") if m["flags"] else [flag_of(f.name)]
    if m["type"] is bool and "/" not in flags[0]:
        flags = [f"{flags[0]}/--no-{flags[0][2:]}"]
    text = m["help"]
    if m["low"] is not None or m["high"] is not None:
        text += f" ({describe_range(m)})"
    if f.default is not None:
        text += f"  [default: {f'{f.default:g}' if isinstance(f.default, float) else f.default}]"
    kwargs = {"default": None, "help": text}
    if m["choices"] is not None:
        kwargs["type"] = click.Choice(list(m["choices"]))
    elif m["type"] is not bool:
        kwargs["type"] = m["type"]
    return click.option(*flags, f.name, **kwargs)


class SettingsOptions:
    """The options of some fields of a settings class: a decorator for commands, and the picker
    of their values from the command's keyword arguments."""

    def __init__(self, cls, names: tuple[str, ...] | None = None):
        self.fields = [f for f in fields(cls) if f.metadata.get("cli", True)
                       and (names is None or f.name in names)]

    def __call__(self, command):
        for f in reversed(self.fields):
            command = _option(f)(command)
        return command

    def values(self, options: dict) -> dict:
        return {f.name: options[f.name] for f in self.fields if options.get(f.name) is not None}
