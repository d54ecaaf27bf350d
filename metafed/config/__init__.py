"""The run configuration (:class:`RunConfig`): a tree of sections, each declared beside its
component (:mod:`metafed.config.tree`), with flat aliases generated from the tree
(:mod:`metafed.config.aliases`). ``build_config`` reads YAML and flags; ``ConfigError`` is the
one-line error the CLI prints."""
from metafed.config.root import NEEDS, STORED_PERSONAL_MODELS, RunConfig, build_config
from metafed.errors import ConfigError

__all__ = ["ConfigError", "NEEDS", "RunConfig", "STORED_PERSONAL_MODELS", "build_config"]
