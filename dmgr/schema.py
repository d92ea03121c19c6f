"""One way to declare and check the settings of synthesis, training and evaluation.

A section of a config is a frozen dataclass: each field's type, its allowed values (`Literal`), its bounds
(`Annotated[..., Field(ge=...)]`) and its default sit on one line. pydantic checks a composed Hydra config
against it (`build`), and every problem becomes one `ConfigError` line: the key, the value, what is
allowed. Rules between fields live in the dataclass's `__post_init__` and raise `ConfigError` themselves.
The same defaults seed Hydra's ConfigStore (`register_defaults`), so the YAML files hold only presets.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError

# Every section refuses keys it does not know (a typo, a `+key=value`).
STRICT_SECTION = ConfigDict(extra="forbid", coerce_numbers_to_str=True)  # out_dir=3 is a name
Flag = Annotated[bool, Field(strict=True)]  # true/false only, not "yes" or 1
UserPath = Annotated[Path, AfterValidator(Path.expanduser)]  # "~/data" works
NonNegative = Annotated[float, Field(ge=0)]


def Count(minimum: int = 1) -> Any:  # noqa: N802 - reads as a type in annotations
    """An integer >= minimum (not a bool, not a string)."""
    return Annotated[int, Field(strict=True, ge=minimum)]


class ConfigError(ValueError):
    pass


def fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={value!r}: {allowed}")


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _section_type(cls: type, loc: tuple) -> type | None:
    """The dataclass reached by following field names `loc` from `cls` (None past a plain value)."""
    for name in loc:
        if not dataclasses.is_dataclass(cls):
            return None
        cls = typing.get_type_hints(cls).get(name)
    return cls if dataclasses.is_dataclass(cls) else None


def _bounds(cls: type, loc: tuple) -> str:
    """'must be >= 1', 'a number in [0, 1]', 'must be > 0 and < 1': the field's bounds, as declared."""
    section = _section_type(cls, loc[:-1])
    hint = typing.get_type_hints(section, include_extras=True)[loc[-1]]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    found = {}
    for member in typing.get_args(hint) if optional else (hint,):  # X | None: the bounds of X
        for info in typing.get_args(member)[1:]:
            for bound in getattr(info, "metadata", []):
                found.update({k: getattr(bound, k) for k in ("ge", "gt", "le", "lt") if hasattr(bound, k)})
    if "ge" in found and "le" in found:
        text = f"a number in [{found['ge']}, {found['le']}]"
    else:
        symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        text = "must be " + " and ".join(f"{symbols[k]} {v}" for k, v in found.items())
    return text + (", or null" if optional else "")


def _allowed(error: dict, cls: type) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "unexpected_keyword_argument":
        section = _section_type(cls, error["loc"][:-1])
        known = sorted(f.name for f in dataclasses.fields(section)) if section else []
        return "unknown setting (a typo?); known: " + ", ".join(known)
    if kind == "literal_error":
        return "allowed: " + ctx["expected"].replace("'", "").replace(" or ", ", ")
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        return _bounds(cls, error["loc"])
    if kind.startswith("bool"):
        return "true or false"
    if kind.startswith("int"):
        return "must be an integer"
    if kind == "missing_argument":
        return "missing: give a value"
    return error["msg"][0].lower() + error["msg"][1:]


def build(cls: type, values: Any, prefix: str = "") -> Any:
    """`values` (a plain dict, e.g. `OmegaConf.to_container(cfg)`) checked and converted to `cls`."""
    try:
        return _adapter(cls).validate_python(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):  # a rule between fields, already one line
            raise cause from None
        loc = error["loc"]
        if any(isinstance(part, int) for part in loc):  # inside a list: name the whole setting and its type
            loc = loc[: next(i for i, part in enumerate(loc) if isinstance(part, int))]
            hint = typing.get_type_hints(_section_type(cls, loc[:-1]))[loc[-1]]
            error = {**error, "type": "list", "msg": f"Must be {hint}".replace("typing.", "")}
        fail(".".join(str(part) for part in (prefix, *loc) if part != ""), error["input"], _allowed(error, cls))


def defaults_of(cls: type) -> dict:
    """The fields of `cls` that have defaults, as plain YAML values (nested sections included)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        if dataclasses.is_dataclass(value):
            value = defaults_of(type(value))
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def register_defaults(node_name: str, cls: type, group: str | None = None, **presets: Any) -> None:
    """Put `cls`'s defaults (plus `presets`) in Hydra's ConfigStore as a plain, untyped node: composing
    stays lenient, so type errors reach `build` and read as one line."""
    from hydra.core.config_store import ConfigStore  # here: the sampler's settings use this module too

    ConfigStore.instance().store(name=node_name, group=group, node={**defaults_of(cls), **presets})
