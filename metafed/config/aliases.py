"""Flat names for the config tree, generated from the sections: every field keeps the name
it had as a flat key (``dp_clip`` is ``privacy.dp.clip``, ``pfedme_lambda`` is pFedMe's
``algorithm.lambda``), so flags, flat YAML keys, ``--set key=value`` and older run folders'
config files keep working. Building the table checks that no two fields share a flat name
(algorithm parameters excepted: one flat name may belong to several algorithms' sections).

:func:`to_tree` turns what a user gave (flat keys, sections as mappings, or both) into the
tree's mapping; :func:`flat_of` turns a dumped tree back into flat keys."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from metafed.config.tree import ALGORITHM_SECTIONS, SECTIONS
from metafed.section import Section


@dataclass(frozen=True)
class Key:
    """One flat key: where it lives in the tree, its field (type, default, description) and
    the heading it is listed under."""

    flat: str
    path: tuple[str, ...]  # section names then the field name; () for the algorithm's parameters
    field: FieldInfo
    title: str


def _is_section(annotation: Any) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


def _walk(cls: type[Section], path: tuple[str, ...]):
    for name, info in cls.model_fields.items():
        if _is_section(info.annotation):
            yield from _walk(info.annotation, (*path, name))
        else:
            yield Key(cls.flat_key(name), (*path, name), info, cls.TITLE)


# the flat key that names the algorithm (its parameters follow it under ``algorithm:``)
ALGORITHM = Key("algorithm", ("algorithm", "name"), FieldInfo(annotation=str, default="fedavg",
                description="the federated algorithm (list: `metafed algorithms`)"), "Algorithm")


def _build() -> tuple[dict[str, Key], dict[str, dict[str, str]]]:
    keys: dict[str, Key] = {"algorithm": ALGORITHM}
    for section, cls in SECTIONS.items():
        for key in _walk(cls, (section,)):
            if key.flat in keys:
                raise TypeError(f"config key {key.flat!r} is both {'.'.join(keys[key.flat].path)} and "
                                f"{'.'.join(key.path)}")
            keys[key.flat] = key
    owners: dict[str, dict[str, str]] = {}  # flat key -> {algorithm: its field name there}
    for algorithm, cls in ALGORITHM_SECTIONS.items():
        for name, info in cls.model_fields.items():
            if name == "name":
                continue
            flat = cls.flat_key(name)
            if flat in keys and keys[flat].path:  # a section's key (or the algorithm's name)
                raise TypeError(f"config key {flat!r} is both {'.'.join(keys[flat].path)} and {algorithm}'s {name}")
            owners.setdefault(flat, {})[algorithm] = name
            keys.setdefault(flat, Key(flat, (), info, "Algorithm"))
    return keys, owners


KEYS, ALGORITHM_KEYS = _build()
SHORT = {(algorithm, cls.model_fields[name].alias or name): name
         for algorithm, cls in ALGORITHM_SECTIONS.items() for name in cls.model_fields}


def default_of(flat: str) -> Any:
    return KEYS[flat].field.get_default(call_default_factory=True)


def short_name(algorithm: str, flat: str) -> str:
    """An algorithm parameter's name inside ``algorithm:`` (its alias, e.g. ``lambda``)."""
    field = ALGORITHM_SECTIONS[algorithm].model_fields[ALGORITHM_KEYS[flat][algorithm]]
    return field.alias or ALGORITHM_KEYS[flat][algorithm]


def _flatten_section(cls: type[Section], given: dict, where: str, put) -> None:
    fields = cls.model_fields
    by_alias = {(info.alias or name): name for name, info in fields.items()}
    for given_name, value in given.items():
        name = by_alias.get(str(given_name).replace("-", "_"), str(given_name).replace("-", "_"))
        if name not in fields:
            raise ValueError(f"unknown config key {where}.{given_name}")
        info = fields[name]
        if _is_section(info.annotation) and isinstance(value, dict):
            _flatten_section(info.annotation, value, f"{where}.{given_name}", put)
        else:
            put(cls.flat_key(name), value, f"{where}.{given_name}")


def flat_of(values: dict) -> tuple[dict, str | None]:
    """Flat keys and the algorithm's name from a mapping with flat keys, sections, or both.
    Raises ValueError naming an unknown key or a key given twice with two values."""
    flat: dict = {}

    def put(key: str, value: Any, where: str) -> None:
        if key in flat and flat[key] != value:
            raise ValueError(f"{key} is given twice, as {where}: {value!r} and {key}: {flat[key]!r}")
        flat[key] = value

    name = None
    group = values.get("algorithm")
    if isinstance(group, dict):
        group = {str(k).replace("-", "_"): v for k, v in group.items()}
        name = group.pop("name", None)
        if not isinstance(name, str):
            raise ValueError("algorithm: a mapping needs `name:` (e.g. algorithm: {name: pfedme, lambda: 15})")
        if name not in ALGORITHM_SECTIONS:
            raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHM_SECTIONS)}")
        cls = ALGORITHM_SECTIONS[name]
        for given, value in group.items():
            field = SHORT.get((name, given), given if given in cls.model_fields else None)
            if field is None:  # a flat key of this algorithm is accepted inside its mapping too
                field = ALGORITHM_KEYS.get(given, {}).get(name)
            if field is None or field == "name":
                params = [cls.model_fields[f].alias or f for f in cls.model_fields if f != "name"]
                raise ValueError(f"algorithm {name!r} has no parameter {given!r} (its parameters: "
                                 f"{', '.join(params) or 'none'})")
            put(cls.flat_key(field), value, f"algorithm.{given}")
    elif group is not None:
        name = group
    unknown = []
    for key, value in values.items():
        key = str(key).replace("-", "_") if isinstance(key, str) else key
        if key == "algorithm":
            continue
        if key in SECTIONS and isinstance(value, dict):
            _flatten_section(SECTIONS[key], value, key, put)
        elif key in KEYS:
            put(key, value, key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError("; ".join(f"unknown config key {k!r}" for k in unknown))
    return flat, name


def tree_of(flat: dict, name: str, named: bool = True) -> dict:
    """The tree mapping of flat keys (the algorithm's parameters must be ``name``'s). With
    ``named`` False and no parameter of it given, the algorithm section is left out (it
    then stays the default's, and is not counted as given)."""
    tree: dict = {"algorithm": {"name": name}}
    for key, value in flat.items():
        if key == "algorithm":
            continue
        if not KEYS[key].path:
            tree["algorithm"][short_name(name, key)] = value
            continue
        node = tree
        for part in KEYS[key].path[:-1]:
            node = node.setdefault(part, {})
        node[KEYS[key].path[-1]] = value
    if not named and tree["algorithm"] == {"name": name}:
        del tree["algorithm"]
    return tree


def flat_name_of(loc: tuple) -> str:
    """The flat key a pydantic error location points at (``privacy.dp.clip`` -> ``dp_clip``)."""
    parts = [str(p) for p in loc]
    if parts[:1] == ["algorithm"] and len(parts) >= 3 and parts[1] in ALGORITHM_SECTIONS:
        field = SHORT.get((parts[1], parts[2]), parts[2])
        return ALGORITHM_SECTIONS[parts[1]].flat_key(field)
    path = tuple(parts)
    for key in KEYS.values():
        if key.path == path:
            return key.flat
    return ".".join(parts)
