"""The compression section of the run configuration."""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional

from pydantic import Field

from metafed.section import Section


class CompressionSection(Section):
    """Compressed uploads and broadcasts (:mod:`metafed.compression`)."""

    TITLE: ClassVar[str] = "Communication"

    compress: Optional[str] = Field(None, description="compress client uploads: identity, randk:F, topk:F "
                                    "(fraction F of coordinates), qsgd:S (S levels), q8, q4 (metafed.compression)")
    error_feedback: bool = Field(False, description="keep what compression did not send as client state and add it "
                                 "to the next upload (Karimireddy et al. 2019)")
    compress_down: Optional[str] = Field(None, description="compress the broadcast model: the server sends each "
                                         "round the encoded change of the clients' replica (same encoders as "
                                         "--compress; what is left out is sent later, metafed.compression.downlink)")
