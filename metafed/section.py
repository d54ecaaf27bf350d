"""The base of every section of the run configuration (:mod:`metafed.config`). A component
declares its section beside its code, as a :class:`Section`: typed fields with their
descriptions and bounds, unknown keys refused. The config tree is assembled from the
sections, and every field keeps a flat name (``dp_clip`` for ``privacy.dp.clip``) so flags,
flat YAML keys and ``--set key=value`` keep working (:mod:`metafed.config.aliases`)."""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # allow_inf_nan=False: "inf" or "nan" is refused wherever a number is meant
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True)

    TITLE: ClassVar[str] = ""  # the heading of its keys in `metafed run --help` and `metafed config show`
    FLAT: ClassVar[dict[str, str]] = {}  # field name -> its flat key, where they differ

    @classmethod
    def flat_key(cls, field: str) -> str:
        return cls.FLAT.get(field, field)
