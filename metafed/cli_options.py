"""`metafed run`'s flags, generated from the config tree's flat keys (:mod:`metafed.config.
aliases`): every config key is a flag, with the field's description, its choices and its
default in ``--help``, listed under its section's heading. A new field in any section
therefore gets its flag with no CLI change.

Every generated option defaults to None, "not given", so the YAML file (``-c``) and the
model's defaults apply unless the flag is typed; the help shows the model's default.
"""
from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any, Optional

import typer

from metafed.config.aliases import KEYS

# keys whose flags are not spelled --key (and --no-key for a switch)
FLAG_NAMES = {
    "dp_adaptive_clip": ("--dp-adaptive-clip/--dp-fixed-clip",),
    "synthetic_iid": ("--synthetic-iid/--synthetic-non-iid",),
    "insecure_reproducible_privacy": ("--insecure-reproducible-privacy",),  # only ever switched on
}
LIST_KEYS = ("hidden", "loggers")  # list-valued keys: comma-separated on the command line


def flag(key: str) -> str:
    """The command-line spelling of a config key."""
    return "--" + key.replace("_", "-")


def _cli_type(annotation: Any) -> tuple[type, list[str]]:
    """(the type the option parses, its choices) for a field annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return _cli_type(next(a for a in args if a is not type(None)))
    if origin is typing.Literal:
        return str, [str(a) for a in args]
    if origin is list:
        return str, []
    if annotation in (int, float, bool, str, Path):
        return annotation, []
    raise TypeError(f"no command-line type for {annotation!r}")


def _shown_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


def config_parameters() -> list[inspect.Parameter]:
    """One keyword-only typer option per config key, in the model's field order."""
    params = []
    for key, spec in KEYS.items():
        field = spec.field
        kind, choices = _cli_type(field.annotation)
        names = FLAG_NAMES.get(key) or ((f"{flag(key)}/--no-{flag(key)[2:]}",) if kind is bool else (flag(key),))
        text = field.description + (f" ({' | '.join(choices)})" if choices else "")
        option = typer.Option(None, *names, help=text, show_default=_shown_default(
            field.get_default(call_default_factory=True)), rich_help_panel=spec.title)
        params.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=Optional[kind]))
    return params


def with_config_flags(command):
    """Give ``command(own options..., **config_values)`` one option per config key, after
    its own options, for typer to read (typer reads ``__signature__`` and ``__annotations__``)."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    generated = config_parameters()
    clash = {p.name for p in own} & {p.name for p in generated}
    if clash:
        raise TypeError(f"options {sorted(clash)} are both the command's own and config keys")
    command.__signature__ = inspect.Signature(own + generated)
    command.__annotations__ = {**typing.get_type_hints(command), **{p.name: p.annotation for p in generated}}
    return command


def parse_list_values(values: dict) -> dict:
    """``--hidden 200,100`` -> [200, 100], ``--loggers tensorboard,mlflow`` -> [...]; raises
    ValueError naming the flag."""
    for key in LIST_KEYS:
        text = values.get(key)
        if not isinstance(text, str):
            continue
        items = [v.strip() for v in text.split(",") if v.strip()]
        inner = typing.get_args(KEYS[key].field.annotation)[0]  # e.g. Annotated[int, Field(ge=1)]
        if (typing.get_args(inner)[0] if typing.get_origin(inner) is typing.Annotated else inner) is not int:
            values[key] = items  # names: the config checks them
            continue
        try:
            values[key] = [int(v) for v in items]
        except ValueError:
            raise ValueError(f"{flag(key)} expects integers separated by commas, got {text!r}") from None
    return values
