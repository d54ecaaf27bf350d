"""What a client's node decides for itself: its privacy policy, fixed when the SuperNode
starts (its ``--node-config``), never taken from a message. The server's messages may ask
for more protection than the policy; a request for less is refused, and the refusal logged
on the node and replied to the server with its reason.

Node config keys (all optional; a node without any keeps to what the run asks, except that
it never opts into the insecure reproducible mode by itself):

- ``dp-clip=C dp-noise-multiplier=Z``: local DP on this node. Every upload leaves clipped to
  norm at most C with Gaussian noise of at least Z x C per coordinate, drawn with this
  node's own OS randomness; a run that asks for no local DP, or a weaker one, is refused.
- ``require-secure-aggregation=true``: never reply an upload in the clear. A node that holds
  a secure-aggregation key (``secagg-key``) requires it whatever this key says.
- ``share-label-counts=true``: answer label-count queries (attention by label
  distribution). Off by default: the counts are this party's label histogram.
- ``max-personalize-steps=N`` (default 100), ``max-heldout-steps=N`` (default 10): bounds on
  the adaptation work one evaluation message may ask of this node.
- ``allow-insecure-reproducible-privacy=true``: TESTS ONLY; lets a run with
  ``insecure_reproducible_privacy`` seed this node's DP noise from the run's seed (anyone
  with the seed can subtract it). Without it such a run is refused.
- ``run-sha256=HEX``: the SHA-256 of the run configuration this node agreed to, every
  section but ``execution`` (which changes where and how the server runs, not what a client
  does or reveals); ``metafed config hash -c run.yaml`` prints it. Any other run is refused.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass

from metafed.privacy.upload import UploadTransform

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no", "")


class PolicyRefusal(ValueError):
    """A request weaker than the node's policy (the reason names the policy key)."""


class NodePolicyError(ValueError):
    """The node config's policy keys are malformed."""


def _what_clients_do(cfg) -> dict:
    """The run configuration's tree without ``execution`` (where the server runs, not what a
    client does or reveals)."""
    return {k: v for k, v in cfg.model_dump(mode="json", by_alias=True).items() if k != "execution"}


def _sha256(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def run_sha256(cfg) -> str:
    """The hash a node pins a run by: SHA-256 of the run configuration's tree without its
    ``execution`` section, as canonical JSON (sorted keys)."""
    return _sha256(_what_clients_do(cfg))


def run_key(cfg) -> str:
    """What a node keys its personal state by: the run's configuration without where the
    server runs (``execution``) and without what a resume may change (rounds, evaluation
    cadence), so a resumed run finds its state and another run does not (16 hex digits)."""
    tree = _what_clients_do(cfg)
    tree["training"] = {k: v for k, v in tree["training"].items() if k != "rounds"}
    tree["evaluation"] = {k: v for k, v in tree["evaluation"].items() if k != "eval_every"}
    return _sha256(tree)[:16]


@dataclass(frozen=True)
class NodePolicy:
    dp_clip: float | None = None
    dp_noise_multiplier: float | None = None
    require_secure_aggregation: bool = False
    share_label_counts: bool = False
    max_personalize_steps: int = 100
    max_heldout_steps: int = 10
    allow_insecure_privacy: bool = False
    run_sha256: str | None = None

    @property
    def local_dp(self) -> UploadTransform | None:
        """The upload stage this node applies at least (None: no local DP of its own)."""
        if self.dp_clip is None:
            return None
        return UploadTransform(clip=self.dp_clip, noise_std=self.dp_noise_multiplier * self.dp_clip)

    # ------------------------------------------------------------------ checks
    def check_run(self, cfg) -> None:
        """A run this node may take part in at all: the pinned one, and not the insecure mode
        unless this node opted in."""
        if self.run_sha256 is not None and run_sha256(cfg) != self.run_sha256:
            raise PolicyRefusal(f"the run's configuration hashes to {run_sha256(cfg)[:16]}..., not the "
                                f"run-sha256 {self.run_sha256[:16]}... this node is pinned to")
        if cfg.insecure_reproducible_privacy and not self.allow_insecure_privacy:
            raise PolicyRefusal("the run asks for insecure_reproducible_privacy (DP noise anyone with the seed can "
                                "remove): this node did not opt in (allow-insecure-reproducible-privacy)")

    def upload_stage(self, requested: UploadTransform | None) -> UploadTransform | None:
        """The upload stage to apply: the requested one, if it protects at least as much as the
        node's local DP (clip no larger, noise multiplier no smaller); refused otherwise."""
        own = self.local_dp
        if own is None:
            return requested
        if requested is None or requested.clip is None:
            raise PolicyRefusal(f"this node's policy is local DP (dp-clip {self.dp_clip}, dp-noise-multiplier "
                                f"{self.dp_noise_multiplier}): it never sends an unclipped, unnoised update")
        z = requested.noise_std / requested.clip
        if requested.clip > own.clip or z < self.dp_noise_multiplier * (1 - 1e-12):
            raise PolicyRefusal(f"the run asks for local DP with clip {requested.clip:g} and noise multiplier {z:g}, "
                                f"weaker than this node's (clip {self.dp_clip:g}, noise multiplier "
                                f"{self.dp_noise_multiplier:g})")
        return requested

    def check_hold(self, hold: bool, holds_secagg_key: bool) -> None:
        """Under a secure-aggregation requirement the upload stays here until it is masked."""
        if not hold and (self.require_secure_aggregation or holds_secagg_key):
            raise PolicyRefusal("this node requires secure aggregation (it holds a secure-aggregation key or its "
                                "policy says require-secure-aggregation): it never replies an upload in the clear")

    def check_evaluation(self, personalize_steps: int, heldout_steps: tuple[int, ...]) -> None:
        if personalize_steps > self.max_personalize_steps:
            raise PolicyRefusal(f"the run asks for {personalize_steps} adaptation steps per evaluation; this node "
                                f"allows at most {self.max_personalize_steps} (max-personalize-steps)")
        if heldout_steps and max(heldout_steps) > self.max_heldout_steps:
            raise PolicyRefusal(f"new-client evaluation asks for {max(heldout_steps)} adaptation steps; this node "
                                f"allows at most {self.max_heldout_steps} (max-heldout-steps)")


def _flag(node_config: dict, key: str) -> bool:
    value = str(node_config.get(key, "")).strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise NodePolicyError(f"node config {key}={node_config[key]!r}: expected true or false")


def _positive(node_config: dict, key: str, kind=float):
    if key not in node_config:
        return None
    try:
        value = kind(node_config[key])
    except (TypeError, ValueError):
        raise NodePolicyError(f"node config {key}={node_config[key]!r}: expected a number") from None
    if not math.isfinite(value) or value <= 0:
        raise NodePolicyError(f"node config {key}={node_config[key]!r}: expected a positive number")
    return value


def policy_from_node_config(node_config: dict) -> NodePolicy:
    """The node's policy from its ``--node-config`` (NodePolicyError naming a bad key)."""
    clip, z = _positive(node_config, "dp-clip"), _positive(node_config, "dp-noise-multiplier")
    if (clip is None) != (z is None):
        raise NodePolicyError("node config: dp-clip and dp-noise-multiplier go together (this node's local DP)")
    pin = node_config.get("run-sha256")
    if pin is not None and (len(str(pin)) != 64 or any(c not in "0123456789abcdef" for c in str(pin).lower())):
        raise NodePolicyError(f"node config run-sha256={pin!r}: expected 64 hex digits")
    return NodePolicy(clip, z, _flag(node_config, "require-secure-aggregation"),
                      _flag(node_config, "share-label-counts"),
                      _positive(node_config, "max-personalize-steps", int) or 100,
                      _positive(node_config, "max-heldout-steps", int) or 10,
                      _flag(node_config, "allow-insecure-reproducible-privacy"),
                      None if pin is None else str(pin).lower())


@functools.lru_cache(maxsize=8)
def cached_policy(items: tuple) -> NodePolicy:
    return policy_from_node_config(dict(items))
