"""Bounded memory for large federations: the client store under a memory cap, incremental
checkpoints, and clients built on demand (the W1 scale dataset)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from metafed.checkpoint import CheckpointError
from metafed.client_store import ClientStore, ClientStoreError
from metafed.data import load_dataset
from metafed.data.lazy import LazyClients, w1_clients
from metafed.run import run
from tests.conftest import SHARED_DATA, small_config


def _state(cid: int, version: int) -> dict:
    g = torch.Generator().manual_seed(cid * 1000 + version)
    return {"personal": {"w": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g)},
            "count": torch.tensor(version)}


def _equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(_equal(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k]) for k in a)


def _play(store: ClientStore, reference: dict, steps: int, seed: int, commit_every: int = 0) -> None:
    """Random puts, gets and residual updates on ``store`` and on a plain dict beside it;
    every read must agree."""
    rng = np.random.default_rng(seed)
    for step in range(steps):
        cid = int(rng.integers(0, 120))
        op = rng.random()
        if op < 0.5:
            state = _state(cid, step)
            store.put(cid, state)
            reference[cid] = {**state, **{k: v for k, v in reference.get(cid, {}).items() if k == "ef_residual"}}
        elif op < 0.6:
            r = torch.full((5,), float(step))
            store.put_private(cid, "ef_residual", r)
            reference[cid] = {**reference.get(cid, {}), "ef_residual": r}
        else:
            got = store.get(cid, dict)
            want = {k: v for k, v in reference.get(cid, {}).items() if k != "ef_residual"}
            assert _equal(got, want), f"client {cid} differs at step {step}"
            want_r = reference.get(cid, {}).get("ef_residual")
            got_r = store.private(cid, "ef_residual")
            assert (got_r is None and want_r is None) or torch.equal(got_r, want_r)
        if commit_every and step % commit_every == commit_every - 1:
            store.commit()
            store.collect()


def test_capped_store_returns_the_same_states_as_memory(tmp_path):
    """Under a cap of ~10 clients' states (120 clients in play), states spill and come back
    unchanged, residuals included; memory stays under the cap."""
    one = sum(v.numel() * v.element_size() for v in (torch.zeros(16, 8), torch.zeros(8), torch.tensor(0)))
    store = ClientStore(tmp_path / "clients", memory_cap=10 * one)
    reference: dict = {}
    _play(store, reference, 3000, seed=1)
    assert store.spilled_segments > 10
    assert store.memory_bytes <= 10 * one + one
    assert len(store) == len(reference)
    flat_ref = ClientStore.from_tensors({})
    for cid, st in reference.items():
        flat_ref._mem[cid] = st
    assert _equal(store.to_tensors(), flat_ref.to_tensors())


def test_commit_then_open_is_the_same_store_and_compaction_bounds_the_disk(tmp_path):
    folder = tmp_path / "clients"
    store = ClientStore(folder, memory_cap=20_000)
    reference: dict = {}
    _play(store, reference, 4000, seed=2, commit_every=97)
    manifest = store.commit()
    store.collect()
    live = sum(v.numel() * v.element_size() for v in store.to_tensors().values())
    on_disk = sum(p.stat().st_size for p in folder.iterdir())
    assert {p.name for p in folder.iterdir()} == {m["file"] for m in manifest}  # nothing stale left behind
    assert on_disk < 3 * live + 200_000  # compaction: stale copies do not pile up (headers aside)
    reopened = ClientStore.open(folder, manifest, memory_cap=20_000)
    assert _equal(reopened.to_tensors(), store.to_tensors())


def test_commit_writes_only_what_changed(tmp_path):
    store = ClientStore(tmp_path / "clients")
    for cid in range(50):
        store.put(cid, _state(cid, 0))
    first = store.commit()
    store.collect()
    store.put(7, _state(7, 1))
    store.put(9, _state(9, 1))
    second = store.commit()
    new = [m["file"] for m in second if m not in first]
    assert len(new) == 1
    from safetensors import safe_open

    with safe_open(str(tmp_path / "clients" / new[0]), framework="pt") as f:
        assert {k.partition("/")[0] for k in f.keys()} == {"7", "9"}


def test_a_tampered_segment_is_refused(tmp_path):
    store = ClientStore(tmp_path / "clients")
    store.put(3, _state(3, 0))
    manifest = store.commit()
    path = tmp_path / "clients" / manifest[0]["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    reopened = ClientStore.open(tmp_path / "clients", manifest)
    with pytest.raises(ClientStoreError, match="does not match its checksum"):
        reopened.get(3, dict)


def test_incremental_checkpoints_resume_exactly_under_a_memory_cap(tmp_path):
    """Ditto (a personal model per client): 4 rounds straight == 2 rounds, then a resume with
    a memory cap of a few clients' models to 4. Global and personal models equal exactly."""
    cfg = dict(algorithm="ditto", ditto_lambda=0.5, rounds=4, num_clients=12, clients_per_round=6)
    straight = run(small_config(out=str(tmp_path / "a"), **cfg))
    run(small_config(out=str(tmp_path / "b"), **{**cfg, "rounds": 2}))
    segments = json.loads((tmp_path / "b" / "checkpoint.json").read_text())["client_segments"]
    assert segments and all((tmp_path / "b" / "clients" / s["file"]).is_file() for s in segments)
    resumed = run(small_config(out=str(tmp_path / "b"), client_memory_mb=0.05, **cfg), resume=tmp_path / "b")
    for k, v in straight.params.items():
        assert torch.equal(v, resumed.params[k])
    assert resumed.federation.clients.spilled_segments > 0
    assert _equal(straight.federation.clients.to_tensors(), resumed.federation.clients.to_tensors())


def test_a_missing_client_segment_is_a_clear_resume_error(tmp_path):
    cfg = dict(algorithm="ditto", ditto_lambda=0.5, rounds=2)
    run(small_config(out=str(tmp_path / "r"), **cfg))
    for p in (tmp_path / "r" / "clients").iterdir():
        p.unlink()
    with pytest.raises(CheckpointError, match="segment .* is missing"):
        run(small_config(out=str(tmp_path / "r"), **{**cfg, "rounds": 3}), resume=tmp_path / "r")


def test_memory_cap_without_a_run_folder_spills_to_a_temporary_folder():
    cfg = dict(algorithm="ditto", ditto_lambda=0.5, rounds=3, num_clients=12, clients_per_round=6)
    capped = run(small_config(client_memory_mb=0.05, **cfg))
    plain = run(small_config(**cfg))
    assert capped.federation.clients.spilled_segments > 0
    assert _equal(capped.federation.clients.to_tensors(), plain.federation.clients.to_tensors())


# ---------------------------------------------------------------------- clients built on demand
def test_lazy_clients_build_on_demand_and_keep_a_bounded_cache():
    built = []

    def make(k):
        built.append(k)
        return w1_clients(50, 0, 0.2, cache=0)[k]

    lazy = LazyClients(w1_clients(50, 0, 0.2).train_sizes(), make, cache=4)
    assert built == []
    for k in (1, 2, 3, 4, 5, 1):
        lazy[k]
    assert built == [1, 2, 3, 4, 5, 1]  # 1 was evicted by 5 (cache of 4)
    assert [lazy[k].num_train for k in range(50)] == lazy.train_sizes().tolist()
    sub = lazy.subset([7, 3])
    assert torch.equal(sub[0].train_x, lazy[7].train_x) and torch.equal(sub[1].train_y, lazy[3].train_y)
    with pytest.raises(IndexError, match="client 50 is not in this federation of 50"):
        lazy[50]


def test_w1_clients_are_the_peers_w1_data():
    """The w1 dataset trains on exactly the peers' W1 clients (shared/peers/common.py)."""
    peers = SHARED_DATA.parent / "peers"  # the shared folder CI puts beside the checkout
    if not SHARED_DATA.parent.is_dir():
        pytest.skip(f"no shared folder at {SHARED_DATA.parent}")
    assert (peers / "common.py").is_file(), f"{peers} lacks the peers' common.py"
    sys.path.insert(0, str(peers))
    try:
        import common
    finally:
        sys.path.remove(str(peers))
    clients = w1_clients(300, 0, 0.2)
    assert clients.train_sizes().tolist() == common.client_sizes(300).tolist()
    for k in (0, 17, 299):
        x, y = common.client_data(k, 300)
        assert torch.equal(clients[k].train_x, x) and torch.equal(clients[k].train_y, y)


def test_a_huge_federation_builds_only_the_clients_a_round_touches():
    """100,000 W1 clients: loading, sampling a round and the summary line build no client
    beyond the cohort and the evaluation sample."""
    cfg = small_config(dataset="w1", num_clients=100_000, clients_per_round=20, eval_clients=10, rounds=1,
                       model="mlp")
    ds = load_dataset(cfg)
    assert ds.num_clients == 100_000 and len(ds.clients._cache) == 0
    assert int(ds.train_sizes().sum()) > 5_000_000
    result = run(cfg, data=ds)
    assert len(ds.clients._cache) <= 20 + 10 + 1 + 200  # cohort, evaluation, the up-front check, label summary
    assert result.rows[-1]["clients_used"] == 20
