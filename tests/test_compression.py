"""Compressed uploads (metafed.compression): unbiased where claimed, error feedback conserves
what clients computed, byte counts equal the packed messages, exact resume with residuals,
and the combinations that cannot work are refused."""
import math

import numpy as np

import pytest
import torch

from metafed.compression import RESIDUAL, UploadCompression, parse_compressor
from metafed.config import ConfigError, build_config
from metafed.run import check_deployable, run
from tests.conftest import small_config


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("spec", ["randk:0.25", "qsgd:2"])
def test_random_k_and_qsgd_are_unbiased(spec):
    enc = parse_compressor(spec)
    x = torch.randn(1, 40, generator=_gen(1), dtype=torch.float64)
    draws = 20000
    total = torch.zeros_like(x)
    gen = _gen(2)
    for _ in range(draws):
        total += enc.decode(enc.encode(x, gen), 40)
    mean = total / draws
    # the estimator's std per coordinate is at most ~ (D/k) |x| or ||x|| / S: 5 standard errors
    bound = 5 * float(x.norm()) * 2 / math.sqrt(draws)
    assert float((mean - x.float()).abs().max()) < bound


def test_error_feedback_conserves_what_clients_computed():
    comp = UploadCompression(parse_compressor("topk:0.1"), error_feedback=True)
    residual, sent, truth = None, torch.zeros(3, 50, dtype=torch.float64), torch.zeros(3, 50, dtype=torch.float64)
    for t in range(6):
        x = torch.randn(3, 50, generator=_gen(t), dtype=torch.float64)
        decoded, residual, _ = comp.apply({"update": {"w": x}}, residual, 99, t, [0, 1, 2])
        sent += decoded["update"]["w"].double()
        truth += x
        assert int((decoded["update"]["w"] != 0).sum(1).max()) <= 5  # k = 10 % of 50 per client
    torch.testing.assert_close(sent + residual, truth, atol=1e-6, rtol=0)  # float32 wire values


@pytest.mark.parametrize("spec", ["identity", "randk:0.1", "topk:0.05", "qsgd:3", "qsgd:16", "q8", "q4"])
@pytest.mark.parametrize("d", [1, 37, 1000])
def test_byte_counts_are_the_packed_message_sizes(spec, d):
    enc = parse_compressor(spec)
    payload = enc.encode(torch.randn(2, d, generator=_gen(d), dtype=torch.float64), _gen(3))
    assert [len(enc.pack(payload, i)) for i in range(2)] == [enc.packed_bytes(d)] * 2


def test_identity_and_uniform_quantization_errors_are_within_their_bounds():
    x = torch.randn(4, 300, generator=_gen(5), dtype=torch.float64)
    assert torch.equal(parse_compressor("identity").decode(parse_compressor("identity").encode(x, _gen()), 300),
                       x.float().double())
    for bits in (8, 4):
        enc = parse_compressor(f"q{bits}")
        err = (enc.decode(enc.encode(x, _gen()), 300) - x).abs().max(dim=1).values
        span = x.max(dim=1).values - x.min(dim=1).values
        assert bool((err <= span / (2 * (2 ** bits - 1)) + 1e-6).all())


def test_bytes_up_is_the_encoded_size_and_resume_keeps_the_residuals(tmp_path):
    cfg = small_config(compress="topk:0.05", error_feedback=True, rounds=4)
    full = run(cfg)
    d = sum(v.numel() for v in full.params.values())
    assert full.rows[0]["bytes_up"] == full.rows[0]["clients_used"] * 8 * math.ceil(0.05 * d)
    store = full.federation.clients
    assert all(store.private(c, RESIDUAL) is not None for c in store.ids())
    out = tmp_path / "run"
    run(cfg.updated(rounds=2, out=out))
    resumed = run(small_config(rounds=4), resume=out)
    for k in full.params:
        assert torch.equal(full.params[k], resumed.params[k]), k
    no_feedback = run(small_config(compress="topk:0.05", rounds=4))
    assert any(not torch.equal(full.params[k], no_feedback.params[k]) for k in full.params)


def test_compressed_clients_agree_across_backends():
    runs = [run(small_config(compress="qsgd:4", backend=b, rounds=2)) for b in ("loop", "vectorized")]
    for k in runs[0].params:
        torch.testing.assert_close(runs[0].params[k], runs[1].params[k], atol=1e-5, rtol=0)


def test_combinations_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="not supported yet"):
        build_config(compress="topk:0.01", secure_aggregation=True)
    with pytest.raises(ConfigError, match="DP guarantee"):
        build_config(compress="q8", dp="central", dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="needs --compress"):
        build_config(error_feedback=True)
    with pytest.raises(ConfigError, match="expected identity, randk:F"):
        build_config(compress="topk:2")
    check_deployable(build_config(compress="q8"))  # compressed uploads run in deployment too


@pytest.mark.parametrize("spec", ["identity", "randk:0.1", "topk:0.05", "qsgd:3", "qsgd:16", "q8", "q4"])
def test_a_client_encodes_alone_what_the_batch_encodes_and_the_server_decodes_its_bytes(spec):
    """Deployment: one client's bytes (encode_one, with its residual) decode at the server
    (decode_one) to exactly its row of the simulation's batched apply; new residuals equal."""
    comp = UploadCompression(parse_compressor(spec), error_feedback=True)
    x = torch.randn(3, 120, generator=_gen(5), dtype=torch.float64)
    residuals = torch.randn(3, 120, generator=_gen(6), dtype=torch.float64) * 0.1
    decoded, new_residuals, size = comp.apply({"u": x}, residuals, 7, 4, [10, 11, 12])
    for i, client in enumerate((10, 11, 12)):
        blob, residual = comp.encode_one(x[i], residuals[i], 7, 4, client)
        assert len(blob) == size
        torch.testing.assert_close(comp.decode_one(blob, 120, 7, 4).float(), decoded["u"][i], atol=0, rtol=0)
        torch.testing.assert_close(residual, new_residuals[i], atol=0, rtol=0)


@pytest.mark.parametrize("spec, corrupt, problem", [
    ("topk:0.05", lambda b: b[:-1], "expected"),
    ("topk:0.05", lambda b: b[:-4] + (10**6).to_bytes(4, "little"), "distinct coordinates"),
    ("q8", lambda b: b"\x00\x00\xc0\x7f" + b[4:], "NaN or Inf"),
    ("qsgd:4", lambda b: b[:4] + b"\xff" * (len(b) - 4), "levels must lie"),
])
def test_a_malformed_encoded_upload_is_refused(spec, corrupt, problem):
    comp = UploadCompression(parse_compressor(spec))
    blob, _ = comp.encode_one(torch.randn(100, generator=_gen(1), dtype=torch.float64), None, 0, 1, 0)
    with pytest.raises(ValueError, match=problem):
        comp.decode_one(corrupt(blob), 100, 0, 1)


# ---------------------------------------------------------------- compressed broadcasts


def _down_state(d=40, n=6):
    from metafed.algorithms.base import ServerState

    return ServerState({"w": torch.randn(d // 4, 4)}), n


def test_compressed_broadcast_keeps_what_it_left_out_for_later():
    """top-k of the change: the replica moves exactly on the k largest coordinates of
    w - replica, and what was not sent stays in w - replica (server-side error feedback)."""
    from metafed.compression.downlink import REPLICA, BroadcastCompression

    comp = BroadcastCompression(parse_compressor("topk:0.25"))
    state, n = _down_state()
    w0 = state.params["w"].reshape(-1).double()
    state, sent, _, _ = comp.apply(state, {"params": state.params}, np.array([0]), n, seed=0, rnd=1)
    torch.testing.assert_close(sent["params"]["w"], state.params["w"])  # round 1: the replica is the model
    moved = {"w": state.params["w"] + torch.randn(10, 4)}
    state = type(state)(moved, state.opt_state, state.extra)
    before = state.extra[REPLICA].double()
    gap = moved["w"].reshape(-1).double() - before
    state, sent, _, _ = comp.apply(state, {"params": moved}, np.array([0]), n, seed=0, rnd=2)
    after = state.extra[REPLICA].double()
    top = gap.abs().topk(10).indices
    rest = torch.ones(40, dtype=torch.bool)
    rest[top] = False
    torch.testing.assert_close(after[top], moved["w"].reshape(-1).double()[top], atol=1e-6, rtol=0)
    assert torch.equal(after[rest], before[rest])
    torch.testing.assert_close(sent["params"]["w"].reshape(-1).double(), after)
    assert w0.shape == after.shape


def test_broadcast_bytes_count_what_each_client_must_download():
    from metafed.compression.downlink import BroadcastCompression

    comp = BroadcastCompression(parse_compressor("topk:0.1"))  # 4 values + 4 int32 indices = 32 bytes
    state, n = _down_state()
    dense, payload = 4 * 40, 32
    state, _, b1, _ = comp.apply(state, {"params": state.params}, np.array([0, 1]), n, 0, 1)
    assert b1 == 2 * dense  # first download: the whole model
    state, _, b2, _ = comp.apply(state, {"params": state.params}, np.array([0, 2]), n, 0, 2)
    assert b2 == payload + dense  # client 0 synced last round; client 2 never did
    state, _, b5, d5 = comp.apply(state, {"params": state.params}, np.array([0, 1]), n, 0, 5)
    assert b5 == 3 * payload + min(dense, 4 * payload)


def test_identity_broadcast_compression_changes_nothing_and_resume_is_exact(tmp_path):
    plain = run(small_config(rounds=3))
    same = run(small_config(rounds=3, compress_down="identity"))
    for k in plain.params:
        assert torch.equal(plain.params[k], same.params[k])
    assert [r["bytes_down"] for r in plain.rows] == [r["bytes_down"] for r in same.rows]
    cfg = dict(rounds=4, compress_down="topk:0.2", compress="q8", num_clients=8, clients_per_round=3)
    straight = run(small_config(out=str(tmp_path / "a"), **cfg))
    run(small_config(out=str(tmp_path / "b"), **{**cfg, "rounds": 2}))
    resumed = run(small_config(out=str(tmp_path / "b"), **cfg), resume=tmp_path / "b")
    for k in straight.params:
        assert torch.equal(straight.params[k], resumed.params[k])
    assert [r["bytes_down"] for r in straight.rows] == [r["bytes_down"] for r in resumed.rows]
    assert straight.rows[-1]["bytes_down"] < plain.rows[-1]["bytes_down"]


def test_broadcast_compression_refusals_name_the_flag():
    with pytest.raises(ConfigError, match="--compress-down 'topk:2'"):
        build_config(compress_down="topk:2")
    with pytest.raises(ConfigError, match="--compress-down keeps one replica"):
        build_config(mode="async", compress_down="q8")


def test_a_node_rebuilds_the_servers_replica_from_the_payloads_it_missed():
    """Deployment: a client that synced in round s applies the packed payloads of rounds
    s+1..t and holds exactly the replica the server trains it from (bit for bit)."""
    from metafed.compression.downlink import REPLICA, BroadcastCompression

    for spec in ("topk:0.1", "randk:0.2", "qsgd:8", "q8"):
        comp = BroadcastCompression(parse_compressor(spec))
        state, n = _down_state(d=400)
        replicas = {}
        for rnd in range(1, 6):
            moved = {"w": state.params["w"] + 0.1 * torch.randn(100, 4)}
            state = type(state)(moved, state.opt_state, state.extra)
            state, sent, _, down = comp.apply(state, {"params": moved}, np.array([rnd % 2]), n, seed=3, rnd=rnd)
            replicas[rnd] = state.extra[REPLICA].clone()
            assert torch.equal(sent["params"]["w"].reshape(-1), replicas[rnd])
        assert down.changes_for(2) is None  # never synced: the dense replica
        base, payloads = down.changes_for(0)  # client 0 synced in rounds 2 and 4: one payload, round 5's
        assert base == 4 and payloads == [down.payloads[5]]
        starts = [r for r in range(1, 5) if all(k in down.payloads for k in range(r + 1, 6))]
        assert starts and min(starts) <= 2, spec  # the kept window reaches back at least 3 rounds
        for r in starts:
            caught = comp.catch_up(replicas[r], [down.payloads[k] for k in range(r + 1, 6)], r + 1, seed=3)
            assert torch.equal(caught, replicas[5]), (spec, r)
        with pytest.raises(ValueError, match="bytes, expected"):
            comp.catch_up(replicas[4], [down.payloads[5][:-1]], 5, seed=3)


def test_a_node_refuses_a_broadcast_it_cannot_apply():
    from metafed.compression.downlink import REPLICA_OUT_OF_SYNC, BroadcastCompression, node_replica

    comp = BroadcastCompression(parse_compressor("topk:0.1"))
    ref = {"w": torch.zeros(10, 4)}
    dense = torch.randn(40)
    assert torch.equal(node_replica(comp, ref, 0, {"replica": dense}, None, 0), dense)
    blob = {"p0": torch.zeros(comp.encoder.packed_bytes(40), dtype=torch.uint8)}
    for base, arrays, stored, says in (
            (0, {"replica": dense[:-1]}, None, "one float32 array 'replica' of 40"),
            (0, {"replica": dense.double()}, None, "float32"),
            (0, {"replica": torch.full((40,), float("nan"))}, None, "NaN"),
            (3, blob, None, f"{REPLICA_OUT_OF_SYNC}: .* holds none"),
            (3, blob, (2, dense), f"{REPLICA_OUT_OF_SYNC}: .* holds round 2"),
            (3, {"q": blob["p0"]}, (3, dense), "uint8 arrays p0"),
            (3, {"p0": blob["p0"][:-1]}, (3, dense), "bytes, expected")):
        with pytest.raises(ValueError, match=says):
            node_replica(comp, ref, base, arrays, stored, 0)
