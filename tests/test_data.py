"""Synthetic generator, partitioners, schedules and local-file loaders."""
import gzip
import json

import numpy as np
import pytest

from metafed.data import load_dataset
from metafed.data.loaders import DataNotFound, load_leaf, load_mnist, read_idx
from metafed.data.partition import partition
from metafed.data.schedule import client_schedule, sample_clients
from metafed.data.synthetic import synthetic_clients
from tests.conftest import needs_shared, small_config


def test_synthetic_shapes_size_law_and_labels():
    clients = synthetic_clients(30, 0.5, 0.5, seed=3)
    expected = np.random.RandomState(3).lognormal(4, 2, 30).astype(int) + 50
    assert [len(y) for _, y in clients] == expected.tolist()
    for x, y in clients:
        assert x.shape == (len(y), 60) and x.dtype == np.float32
        assert y.min() >= 0 and y.max() <= 9
    # heterogeneity: clients' label distributions differ (non-IID)
    majority = {int(np.bincount(y, minlength=10).argmax()) for _, y in clients}
    assert len(majority) > 1


def test_synthetic_pfedme_sizes_reproduced():
    sizes = [len(y) for _, y in synthetic_clients(100, 0.5, 0.5, seed=0, size_multiplier=5)]
    assert (min(sizes), max(sizes), sum(sizes)) == (250, 25810, 205795)


def test_synthetic_iid_variant_shares_one_model():
    clients = synthetic_clients(5, 0.0, 0.0, seed=1, iid=True)
    means = np.stack([x.mean(0) for x, _ in clients])
    assert np.abs(means).max() < 1.0  # x ~ N(0, Sigma) everywhere
    assert synthetic_clients(5, 1, 1, seed=2)[0][0].tobytes() == synthetic_clients(5, 1, 1, seed=2)[0][0].tobytes()


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards", "quantity"])
def test_every_sample_assigned_exactly_once(name):
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    parts = partition(name, labels, 20, np.random.default_rng(1), alpha=0.5, shards_per_client=2)
    assert len(parts) == 20
    merged = np.concatenate(parts)
    assert np.array_equal(np.sort(merged), np.arange(1000))
    assert min(len(p) for p in parts) >= 2


def _classes_per_client(alpha: float) -> float:
    labels = np.repeat(np.arange(10), 200)
    parts = partition("dirichlet", labels, 20, np.random.default_rng(0), alpha=alpha)
    # classes holding >= 5% of a client's data
    return float(np.mean([(np.bincount(labels[p], minlength=10) / len(p) >= 0.05).sum() for p in parts]))


def test_dirichlet_alpha_controls_label_skew():
    assert _classes_per_client(0.1) < 4 < 9 < _classes_per_client(1000.0)


def test_dirichlet_large_alpha_matches_global_proportions():
    labels = np.repeat(np.arange(4), [100, 200, 300, 400])
    parts = partition("dirichlet", labels, 5, np.random.default_rng(0), alpha=1e4)
    for p in parts:
        share = np.bincount(labels[p], minlength=4) / len(p)
        np.testing.assert_allclose(share, [0.1, 0.2, 0.3, 0.4], atol=0.05)


def test_shards_give_few_labels():
    labels = np.repeat(np.arange(10), 100)
    parts = partition("shards", labels, 10, np.random.default_rng(0), shards_per_client=2)
    assert max(len(np.unique(labels[p])) for p in parts) <= 2


def test_partition_errors_are_clear():
    with pytest.raises(ValueError, match="unknown partition"):
        partition("zipf", np.zeros(10), 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shards"):
        partition("shards", np.zeros(10), 20, np.random.default_rng(0), shards_per_client=2)


def test_schedule_covers_each_epoch_once_and_pads():
    sched = client_schedule(23, batch_size=10, epochs=2, steps=None, batches_per_step=1, rng=np.random.default_rng(0))
    assert sched.shape == (6, 1, 10)
    for epoch in (sched[:3], sched[3:]):
        flat = epoch.reshape(-1)
        assert np.array_equal(np.sort(flat[flat >= 0]), np.arange(23)) and (flat < 0).sum() == 7
    fixed = client_schedule(5, batch_size=4, epochs=1, steps=7, batches_per_step=2, rng=np.random.default_rng(0))
    assert fixed.shape == (7, 2, 4)


def test_sampling_is_seeded_and_without_replacement():
    a = sample_clients(100, 10, rnd=3, seed=7)
    assert len(set(a.tolist())) == 10 and np.array_equal(a, sample_clients(100, 10, rnd=3, seed=7))
    assert not np.array_equal(a, sample_clients(100, 10, rnd=4, seed=7))


def test_digits_dataset_has_train_and_test_per_client():
    ds = load_dataset(small_config(heldout_fraction=0.25))
    assert len(ds.clients) == 6 and len(ds.heldout) == 2
    total = sum(c.num_train + c.num_test for c in ds.clients + ds.heldout)
    assert total == 1797
    assert all(c.num_test >= 1 and c.num_train >= 1 for c in ds.clients)


def test_mnist_idx_from_shared_data(tmp_path):
    root = needs_shared("mnist")
    labels = read_idx(root / "t10k-labels-idx1-ubyte.gz", 1)
    assert labels.shape == (10000,) and labels.max() == 9
    # raw (un-gzipped) files are read too
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(gzip.open(root / "t10k-labels-idx1-ubyte.gz").read())
    assert np.array_equal(read_idx(tmp_path / "t10k-labels-idx1-ubyte", 1), labels)
    x, y = load_mnist(root)
    assert x.shape == (70000, 784) and 0.0 <= x.min() and x.max() <= 1.0


def test_truncated_idx_is_a_clear_error(tmp_path):
    bad = tmp_path / "x-idx"
    bad.write_bytes(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + bytes(10))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(bad, 1)


def test_leaf_femnist_and_shakespeare_from_shared_data():
    users = load_leaf(needs_shared("femnist"), text=False)
    assert len(users) == 105
    name, tx, ty, vx, vy = users[0]
    assert tx.shape[1] == 784 and ty.max() < 62 and len(vx) == len(vy)
    text = load_leaf(needs_shared("shakespeare"), text=True)
    assert len(text) == 10 and text[0][1].shape[1] == 80 and text[0][2].max() < 80


def test_leaf_missing_and_corrupt(tmp_path):
    with pytest.raises(DataNotFound):
        load_leaf(tmp_path / "nope", text=False)
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "train" / "a.json").write_text("{not json")
    (tmp_path / "test" / "a.json").write_text(json.dumps({"users": [], "user_data": {}}))
    with pytest.raises(ValueError, match="not valid LEAF JSON"):
        load_leaf(tmp_path, text=False)


def test_mnist_needs_a_data_dir(monkeypatch):
    monkeypatch.delenv("METAFED_DATA", raising=False)
    with pytest.raises(DataNotFound, match="--data-dir"):
        load_dataset(small_config(dataset="mnist"))


def test_digits_ship_with_the_package_byte_for_byte():
    """digits.npz is the UCI digits test set as scikit-learn distributes it (golden digest),
    so the package needs no scikit-learn."""
    import hashlib

    import numpy as np

    from metafed.data.loaders import DIGITS_FILE, load_digits

    with np.load(DIGITS_FILE) as d:
        x, y = d["x"], d["y"]
    assert x.shape == (1797, 64) and x.dtype == np.uint8 and int(x.max()) == 16
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    digest = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    assert digest == "87ff0c9e40dc7e2c0e34e7257799c2e3f3aec1a016363bb11cad869ec428a826"
    xs, ys = load_digits()
    assert xs.dtype == np.float32 and float(xs.max()) == 1.0 and ys.dtype == np.int64
