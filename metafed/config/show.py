"""The config as people read it: ``config.yaml`` in a run folder (the tree) and ``metafed
config show`` (the tree with each key's description and whether it is the default)."""
from __future__ import annotations

import json
from typing import Any

import yaml
from pydantic import BaseModel

from metafed.config.aliases import default_of
from metafed.config.root import RunConfig
from metafed.section import Section
from metafed.version import __version__


def tree_dump(cfg: RunConfig) -> dict[str, Any]:
    """The config as a tree of plain values (what config.yaml holds; loads back to ``cfg``)."""
    return cfg.model_dump(mode="json", by_alias=True)


def _scalar(name: str, value: Any) -> str:
    text = yaml.safe_dump({name: value}, default_flow_style=True, sort_keys=False, width=10**6)
    return text.strip().removeprefix("{").removesuffix("}")


def _lines(section: BaseModel, values: dict, indent: str) -> list[str]:
    out = []
    cls = type(section)
    fields = sorted(cls.model_fields.items(), key=lambda item: item[0] != "name")  # an algorithm's name first
    for name, info in fields:
        shown = info.alias or name
        value = values[shown]
        if isinstance(getattr(section, name), BaseModel):
            out += [f"{indent}{shown}:"] + _lines(getattr(section, name), value, indent + "  ")
            continue
        if name == "name":
            out.append(f"{indent}name: {value}")
            continue
        flat = cls.flat_key(name) if isinstance(section, Section) else name
        default = json.loads(json.dumps(default_of(flat), default=str))
        state = "default" if value == default else "set"
        out.append(f"{indent}{_scalar(shown, value)}  # {info.description} [{state}]")
    return out


def show_config(cfg: RunConfig) -> str:
    """``metafed config show``: the resolved config as loadable YAML, section by section, each
    key with its description and whether it is the default."""
    from metafed.algorithms import ALGORITHMS

    values = tree_dump(cfg)
    spec = ALGORITHMS[cfg.algorithm.name]
    out = [f"# metafed {__version__}: the resolved config of `{cfg.algorithm.name}` (load it with metafed run -c FILE)",
           f"# {cfg.algorithm.name}: {spec.summary}", f"# paper: {spec.paper}"]
    for name in RunConfig.model_fields:
        section = getattr(cfg, name)
        title = type(section).TITLE or "Algorithm"
        out += ["", f"# --- {title}", f"{name}:"] + _lines(section, values[name], "  ")
    return "\n".join(out) + "\n"
