"""Typed command options: one dataclass per command is the single list of its options and defaults.

A config field declared with `option(default, "help", ...)` is a keyword of the Python API function and an option of
the command line: `add_options(parser, Config)` builds the argparse options from the fields (flag `--batch-size` for
field `batch_size`, type and choices from the annotation), `from_namespace(Config, args)` builds the config back.
`Config.__post_init__` validates (`check_types` first): the library and the CLI refuse the same bad values with the
same `UsageError`.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import types
import typing
from dataclasses import MISSING, Field
from typing import Any, Callable, Generic, ParamSpec, Sequence, TypeVar

from featshard.errors import UsageError

P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C")
_NONE = type(None)


def option(default: Any = MISSING, help: str = "", *, flag: str | None = None, short: str | None = None,
           choices: Sequence[Any] | None = None, metavar: str | None = None, positional: bool = False,
           cli: bool = True, group: str | None = None, passthrough: type | None = None,
           skip: Sequence[str] = ()) -> Any:
    """A config field that is also a command-line option. `flag`: the option string when it is not `--field-name`
    (e.g. `--no-normalize` for `normalize: bool = True`, `--from` for `other`); `positional`: an argument without a
    flag (a `list[str]` positional takes one or more); `cli=False`: API only. `passthrough`: a dict field holding
    another command's options (its CLI fields but `skip`, under `group`), e.g. the `run` options of `slurm`."""
    meta = {"help": help, "flag": flag, "short": short, "choices": tuple(choices) if choices else None,
            "metavar": metavar, "positional": positional, "cli": cli, "group": group, "passthrough": passthrough,
            "skip": tuple(skip)}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) for `X | None`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and _NONE in args:
        rest = [a for a in args if a is not _NONE]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _check_value(name: str, value: Any, tp: Any) -> Any:
    base, optional = _base(tp)
    if value is None:
        if optional:
            return None
        raise UsageError(f"{name} must not be None")
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{name} must be a list, not {type(value).__name__} ({value!r})")
        inner = (typing.get_args(base) or (Any,))[0]
        return [_check_value(name, v, inner) for v in value]
    if origin is dict or base is Any or origin is not None and base not in (int, float, str, bool):
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is str and hasattr(value, "__fspath__"):
        return str(value)
    if isinstance(base, type) and (not isinstance(value, base) or (base is int and isinstance(value, bool))):
        raise UsageError(f"{name} must be {base.__name__}, not {type(value).__name__} ({value!r})")
    return value


def check_types(config: Any) -> None:
    """Check (and lightly coerce: int -> float, PathLike -> str) every field against its annotation, and its
    choices; raise UsageError naming the option otherwise. Call first in `__post_init__`."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        value = _check_value(_label(f), getattr(config, f.name), hints[f.name])
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise UsageError(f"{_label(f)} {value!r}: choose from {', '.join(map(str, choices))}")
        object.__setattr__(config, f.name, value)


def _label(f: Field[Any]) -> str:
    if f.metadata.get("positional"):
        return f.name.upper()
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def cli_fields(cls: type) -> list[Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]


def _default(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def add_options(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = (), prefix: str = "") -> None:
    """Add one argparse option per CLI field of `cls` (dest = `prefix` + the field name; default = the field's
    default, or none at all with a `prefix`: a passed-through option the user did not give stays unset)."""
    hints = _hints(cls)
    groups: dict[str, Any] = {}
    for f in cli_fields(cls):
        if f.name in skip:
            continue
        group_name = f.metadata.get("group")
        target = groups.setdefault(group_name, parser.add_argument_group(group_name)) if group_name else parser
        inner = f.metadata.get("passthrough")
        if inner is not None:
            add_options(target, inner, f.metadata["skip"], prefix=f"{f.name}__")
            continue
        names, kwargs = _argument(f, hints[f.name])
        if prefix:
            kwargs.update(dest=prefix + f.name, default=argparse.SUPPRESS)
        target.add_argument(*names, **kwargs)


def _argument(f: Field[Any], tp: Any) -> tuple[list[str], dict[str, Any]]:
    md, default = f.metadata, _default(f)
    base, _ = _base(tp)
    kwargs: dict[str, Any] = {"help": md["help"]}
    if md["metavar"]:
        kwargs["metavar"] = md["metavar"]
    if md["choices"]:
        kwargs["choices"] = md["choices"]
    if md["positional"]:
        if typing.get_origin(base) is list:
            kwargs["nargs"] = "+"
        return [f.name], kwargs
    names = [md["flag"] or "--" + f.name.replace("_", "-")] + ([md["short"]] if md["short"] else [])
    kwargs["dest"] = f.name
    if base is bool and default is None:
        kwargs.update(action=argparse.BooleanOptionalAction, default=None)
    elif base is bool:
        kwargs.update(action="store_false" if default else "store_true", default=default)
    elif typing.get_origin(base) is list:
        inner = (typing.get_args(base) or (str,))[0]
        kwargs.update(action="append", type=inner, default=None)
    else:
        kwargs.update(type=base if base in (int, float) else str)
        if default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
    return names, kwargs


def from_namespace(cls: Callable[..., C], args: argparse.Namespace) -> C:
    """The config from parsed arguments (an `append` option given no time keeps the field's default)."""
    values: dict[str, Any] = {}
    for f in cli_fields(cls):  # type: ignore[arg-type]
        if f.metadata.get("passthrough") is not None:
            head = f"{f.name}__"
            values[f.name] = {k[len(head):]: v for k, v in vars(args).items() if k.startswith(head)}
        elif hasattr(args, f.name):
            value = getattr(args, f.name)
            if value is None and typing.get_origin(_base(_hints(cls)[f.name])[0]) is list:  # type: ignore[arg-type]
                continue
            values[f.name] = value
    return cls(**values)


def to_argv(cls: type, values: dict[str, Any]) -> list[str]:
    """`values` (some fields of `cls`) as command-line words, in the order of the fields."""
    words: list[str] = []
    for f in cli_fields(cls):
        if f.name not in values:
            continue
        value, default = values[f.name], _default(f)
        names, kwargs = _argument(f, _hints(cls)[f.name])
        action = kwargs.get("action")
        if action in ("store_true", "store_false"):
            words += [names[0]] if value != default else []
        elif action is argparse.BooleanOptionalAction:
            words += [] if value is None else [names[0] if value else "--no-" + names[0][2:]]
        elif action == "append":
            words += [w for v in value for w in (names[0], str(v))]
        else:
            words += [names[0], str(value)]
    return words


class Command(Generic[P, C, R]):
    """An API function: called with the config's own arguments (`featshard.run("list.txt", "RUN", gpus="0-7")`,
    typed by the config's signature) or, `with_config`, with a ready config (what the CLI does)."""

    def __init__(self, cls: Callable[P, C], fn: Callable[[C], R]) -> None:
        self._cls, self._fn = cls, fn
        functools.update_wrapper(self, fn)
        self.__signature__ = inspect.signature(cls).replace(return_annotation=inspect.signature(fn).return_annotation)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._fn(self._cls(*args, **kwargs))

    def with_config(self, config: C) -> R:
        return self._fn(config)

    def __repr__(self) -> str:
        return f"<featshard command {self._fn.__name__}{self.__signature__}>"


def takes(cls: Callable[P, C]) -> Callable[[Callable[[C], R]], Command[P, C, R]]:
    """Make `fn(config) -> R` an API function taking the config's arguments (see Command)."""

    def wrap(fn: Callable[[C], R]) -> Command[P, C, R]:
        return Command(cls, fn)

    return wrap
