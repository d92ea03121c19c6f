"""What every command-line entry point shares: Ctrl-C (SIGINT) ends it with one line and exit status 130,
the shell's code for a SIGINT, instead of a traceback; options derived from a settings dataclass
(`add_settings`, `settings_from`), so each default is written once."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

from dmgr.schema import ConfigError, build

F = TypeVar("F", bound=Callable)

INTERRUPTED = 130  # 128 + SIGINT


def program(module: str) -> str:
    """A tool's name in its usage and error lines, as it was run: its console script (`dmgr-preview`, installed
    by pyproject.toml) or `python -m MODULE`."""
    name = Path(sys.argv[0]).name
    return name if name.startswith("dmgr-") else f"python -m {module}"


def stop_on_interrupt(prog: str, hint: str = "") -> Callable[[F], F]:
    """Decorate a CLI's main: KeyboardInterrupt prints `PROG: interrupted (Ctrl-C)[; HINT]` on stderr and
    exits 130. Under @hydra.main it goes below it, on the task function."""

    def decorate(main: F) -> F:
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                interrupted(prog, hint)

        return run  # type: ignore[return-value]

    return decorate


def interrupted(prog: str, hint: str = "") -> None:
    """The one line and exit status of a Ctrl-C."""
    print(f"{prog}: interrupted (Ctrl-C){'; ' + hint if hint else ''}", file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED)


# --- options from a settings dataclass -------------------------------------------------------------------
#
# A CLI's options are the fields of a frozen settings dataclass (dmgr.schema): `add_settings` adds one
# `--kebab-name` option per field, with the field's type, default, choices (a `Literal`) and help
# (`Annotated[..., Field(description=...)]`); `settings_from` checks the parsed values with `dmgr.schema.build`.
# A default is written once, in the dataclass.


def option_name(field: str) -> str:
    """`patches_per_class` -> `--patches-per-class`."""
    return "--" + field.replace("_", "-")


def _unwrap(hint: Any) -> tuple[Any, list]:
    """(the plain type, the Annotated metadata) of a field's type hint; `X | None` is an X (default None)."""
    metadata = []
    while True:
        if typing.get_origin(hint) is Annotated:
            metadata += list(hint.__metadata__)
            hint = typing.get_args(hint)[0]
        elif typing.get_origin(hint) in (typing.Union, types.UnionType):
            members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
            if len(members) != 1:
                raise TypeError(f"{hint}: a CLI option takes one type (or it and None)")
            hint = members[0]
        else:
            return hint, metadata


def _description(metadata: list) -> str | None:
    return next((m.description for m in metadata if getattr(m, "description", None)), None)


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def option_kwargs(field: dataclasses.Field, hint: Any, help: str | None = None) -> dict:
    """`add_argument` keyword arguments of one dataclass field."""
    kind, metadata = _unwrap(hint)
    text = help if help is not None else _description(metadata)
    default = _field_default(field)
    kwargs: dict[str, Any] = {"dest": field.name}
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
        if default is not None and kind is not bool:
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            text = f"{text + ' ' if text else ''}(default {shown})"
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is typing.Literal:
        kwargs["choices"] = typing.get_args(kind)
        kwargs["type"] = type(kwargs["choices"][0])
    elif typing.get_origin(kind) is tuple:
        item, *rest = typing.get_args(kind)
        if rest != [Ellipsis]:
            raise TypeError(f"{field.name}: a CLI option takes tuple[X, ...]")
        kwargs["nargs"] = "+"
        kwargs["type"] = _unwrap(item)[0]
    elif kind in (int, float, str, Path):
        kwargs["type"] = kind
    else:
        raise TypeError(f"{field.name}: no CLI option for the type {kind}")
    kwargs["help"] = text and text.replace("%", "%%")  # argparse formats help with %
    return kwargs


def add_settings(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    skip: Iterable[str] = (),
    help: Mapping[str, str] | None = None,
) -> None:
    """One `--kebab-name` option per field of the settings dataclass `cls` (but `skip`): its type, its default
    (a field without one is a required option), choices from a `Literal`, a bool as `--flag/--no-flag`, help
    from `Annotated[..., Field(description=...)]` or, for a dataclass that is not a CLI's own, from `help`."""
    hints = typing.get_type_hints(cls, include_extras=True)
    help = help or {}
    for field in dataclasses.fields(cls):
        if field.name not in skip:
            kwargs = option_kwargs(field, hints[field.name], help.get(field.name))
            parser.add_argument(option_name(field.name), **kwargs)


def settings_from(parser: argparse.ArgumentParser, args: argparse.Namespace, cls: type) -> Any:
    """`cls` built from the parsed options with `dmgr.schema.build`; a bad value ends the program with one
    line naming the option (`PROG: error: --max=0: must be >= 1`) and exit status 2."""
    names = [f.name for f in dataclasses.fields(cls)]
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    try:
        return build(cls, values)
    except ConfigError as err:
        key, sep, rest = str(err).partition("=")
        message = f"{option_name(key)}={rest}" if sep and key in names else str(err)
        usage_error(parser.prog, " ".join(message.split()))


def usage_error(prog: str, message: str) -> typing.NoReturn:
    """`PROG: error: MESSAGE` on stderr, exit status 2 (argparse's status for a bad option)."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
