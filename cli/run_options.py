"""The run settings as command-line options: every setting ``RunSettings`` declares with an option becomes one,
with its declared default and help, on each command that takes a ``run: RunSettings``.

So a setting is declared once (contracts/settings.py) and ``coordinator start`` and ``simulate`` offer the same
options with the same help; a value out of range is refused with the option's name and what it expects.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import typer

from cli.common import fail
from contracts.settings import SETTING_TYPES, RunSettings, SettingsError

RUN = "run"  # the parameter a command receives its RunSettings as
PANEL = "Run settings"  # where --help lists them, apart from the command's own options


def options() -> dict[str, str]:
    """Field name -> the option that sets it (``--on/--off`` for a switch), for every setting on the command line."""
    return {f.name: declared.option or f"--{f.name.replace('_', '-')}"
            for f, declared in RunSettings.declared() if declared.option is not None}


def flag_of(key: str) -> str:
    """The option a run-config key is set by (its first name for a switch), or the key itself."""
    name = key.replace("-", "_")
    return options().get(name, f"--{key}").split("/")[0]


def parameters() -> list[inspect.Parameter]:
    """A keyword parameter typer reads as each setting's option, in declaration order."""
    flags = options()
    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=Annotated[
                SETTING_TYPES[f.type], typer.Option(flags[f.name], help=declared.help, rich_help_panel=PANEL)])
            for f, declared in RunSettings.declared() if f.name in flags]


def build(values: Mapping[str, Any]) -> RunSettings:
    """The declared defaults with the options' values; out of range: a clear error naming the option."""
    try:
        return RunSettings.defaults(**values)
    except SettingsError as e:
        message = str(e)
        if e.key:
            message = message.replace(f"run setting {e.key}", flag_of(e.key))
        raise fail(message) from None


def with_run_options(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with every run setting's option after its own; it is called with them as ``run``, a checked
    ``RunSettings``, and may ``run.replace`` the settings it owns."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != RUN]
    generated = parameters()
    names = [p.name for p in generated]
    clash = {p.name for p in own} & set(names)
    if clash:
        raise TypeError(f"{command.__name__}: its own options {sorted(clash)} are run settings already")

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        run = build({name: kwargs.pop(name) for name in names})
        return command(**kwargs, **{RUN: run})

    wrapper.__signature__ = inspect.Signature([*own, *generated])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {}  # typer reads the signature's (evaluated) annotations, not the wrapped function's
    return wrapper
