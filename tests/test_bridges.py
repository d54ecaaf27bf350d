"""Hugging Face datasets and Flower Datasets partitioners become federations (extra [hf]),
tested on a small dataset built in memory and on a local parquet file (no hub access)."""
import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
partitioners = pytest.importorskip("flwr_datasets.partitioner")

from metafed import RunConfig, run  # noqa: E402
from metafed.data.bridges import from_hf  # noqa: E402
from metafed.data.loaders import load_digits  # noqa: E402


def _digits_dataset(n: int = 400) -> "datasets.Dataset":
    x, y = load_digits()
    pixels = np.round(x[:n] * 255).astype(np.uint8).reshape(n, 8, 8)
    return datasets.Dataset.from_dict({"image": pixels.tolist(), "label": y[:n].tolist(),
                                       "writer": (np.arange(n) % 7).tolist()}).cast_column(
        "label", datasets.ClassLabel(num_classes=10))


def test_a_flower_partitioner_gives_one_client_per_partition_and_trains(tmp_path):
    ds = _digits_dataset()
    part = partitioners.DirichletPartitioner(num_partitions=6, partition_by="label", alpha=0.5, seed=0,
                                             min_partition_size=5)
    data = from_hf(ds, x="image", y="label", partitioner=part, heldout_fraction=1 / 6, x_scale=255)
    assert data.num_clients == 5 and len(data.heldout) == 1 and data.num_classes == 10
    assert data.input_shape == (8, 8) and data.clients[0].train_x.dtype.is_floating_point
    total = sum(c.num_train + c.num_test for c in [*data.clients, *data.heldout])
    assert total == len(ds)  # every sample in exactly one client
    result = run(RunConfig(num_clients=5, clients_per_round=3, rounds=2, local_steps=2, hidden=[16],
                           progress=False, out=tmp_path / "run"),
                 model=lambda: __import__("torch").nn.Sequential(__import__("torch").nn.Flatten(),
                                                                 __import__("torch").nn.Linear(64, 10)),
                 data=data)
    assert (tmp_path / "run" / "summary.json").exists() and result.rows[-1]["global_accuracy"] >= 0


def test_a_column_names_the_clients_and_a_parquet_file_loads_locally(tmp_path):
    path = tmp_path / "digits.parquet"
    _digits_dataset().to_parquet(str(path))
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    data = from_hf(ds, x="image", y="label", by="writer")
    assert [c.name for c in data.clients] == [str(i) for i in range(7)]
    assert all(abs(c.num_train + c.num_test - 400 / 7) < 1 for c in data.clients)


def test_bridge_mistakes_are_named():
    ds = _digits_dataset(20)
    with pytest.raises(ValueError, match="x='pixels' is not a column .*image, label, writer"):
        from_hf(ds, x="pixels", y="label", by="writer")
    with pytest.raises(ValueError, match="exactly one of by="):
        from_hf(ds, x="image", y="label")
    with pytest.raises(ValueError, match="integer class ids"):
        floats = datasets.Dataset.from_dict({"image": [[0.0] * 4] * 4, "label": [0.5, 1.0, 0.0, 2.0],
                                             "writer": [0, 0, 1, 1]})
        from_hf(floats, x="image", y="label", by="writer")
