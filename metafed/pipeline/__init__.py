"""The server's aggregation pipeline as a chain of typed stages (optax's ``chain``, TFF's
composition): validated replies flow through the stages of :class:`Chain` and come out as
the aggregate the algorithm's server update takes.

- :mod:`~metafed.pipeline.flow`: what flows (:class:`Flow`), what a stage may ask of the
  round (:class:`RoundContext`) and the stage contract (:class:`ServerStage`).
- :mod:`~metafed.pipeline.stages`: the stages metafed ships (gate, aggregation rule, secure
  sum, division by the summed weight, clipped sum, central noise).
- :mod:`~metafed.pipeline.chain`: :class:`Chain` (refuses a wrong order when built) and
  :func:`build_chain`, the one place that turns a config into stages.

The per-client stages (clip, local noise, own weight, count bit) are plain data,
:class:`~metafed.privacy.upload.UploadTransform`, that travel in the message and run where
the client runs."""
from metafed.pipeline.chain import Chain, ChainError, build_chain
from metafed.pipeline.flow import Flow, RoundContext, ServerStage

__all__ = ["Chain", "ChainError", "Flow", "RoundContext", "ServerStage", "build_chain"]
