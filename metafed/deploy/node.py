"""What one SuperNode holds: its own data partition, the model and algorithm rebuilt from
the run's config, and its personal state on its own disk, in a folder private to its user
(:mod:`metafed.deploy.private_state`), keyed by run. Nothing here is sent anywhere."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from metafed import tree
from metafed.algorithms import make_algorithm
from metafed.backends.base import ClientTask
from metafed.backends.loop import LoopBackend
from metafed.client.task import LocalWork, make_task
from metafed.config import RunConfig
from metafed.data import load_dataset
from metafed.data.federated import ClientData
from metafed.eval import Evaluator
from metafed.models import FunctionalModel, build_or_call
from metafed.deploy.policy import run_key
from metafed.deploy.private_state import default_state_root, private_folder, write_private


class NodeConfigError(ValueError):
    """The SuperNode's --node-config does not describe usable data."""


@dataclass
class Node:
    cfg: RunConfig
    client_id: int  # training client id, or the index among held-out clients (role "heldout")
    data: ClientData
    input_shape: tuple[int, ...]
    num_classes: int
    state_dir: Path
    role: str = "train"  # "heldout": never trains, only scores new-client accuracy
    model_fn: object = None  # your own nn.Module factory (flower_apps), else the config's model

    @functools.cached_property
    def algorithm(self):
        from metafed.data import DEFAULT_MODEL

        name = self.cfg.model or DEFAULT_MODEL[self.cfg.dataset]
        module = build_or_call(self.model_fn, name, self.input_shape, self.num_classes, self.cfg.seed,
                               tuple(self.cfg.hidden))
        if not self.cfg.needs_groups:
            return make_algorithm(self.cfg, FunctionalModel(module))
        # model groups (distillation): drawn over the training clients as the server draws them.
        # What a client scores comes in the broadcast, so the node holds no public inputs: a
        # placeholder of their count (public_size) sizes the programs as the server's do
        from metafed.data.federated import FederatedDataset

        training = self.cfg.num_clients - int(round(self.cfg.num_clients * self.cfg.heldout_fraction))
        empty = FederatedDataset(self.cfg.dataset, [], self.input_shape, self.num_classes)
        count = self.cfg.public_size if self.cfg.needs_public_inputs else 0
        return make_algorithm(self.cfg, FunctionalModel(module), empty, name, num_clients=training,
                              public=torch.zeros((count, *self.input_shape), dtype=self.data.train_x.dtype))

    @property
    def group(self) -> int:
        """This client's model group (0 for every ordinary algorithm)."""
        return self.algorithm.group_of(self.client_id) if self.role == "train" else 0

    @functools.cached_property
    def backend(self) -> LoopBackend:
        """The reference backend: one client, one task at a time."""
        return LoopBackend(self.cfg.device)

    @functools.cached_property
    def evaluator(self) -> Evaluator:
        return Evaluator.from_config(self.algorithm, self.backend, self.cfg)

    def task(self, rnd: int, program, broadcast: dict) -> ClientTask:
        """This client's task in round ``rnd``, built as the simulation builds it
        (:func:`metafed.client.task.make_task`), from the state on this node's disk."""
        return make_task(self.data, self.client_id, rnd, program, self.load_state(broadcast),
                         LocalWork.of_round(self.cfg, self.algorithm, rnd))

    # ------------------------------------------------------------------ personal state on disk
    @functools.cached_property
    def run_dir(self) -> Path:
        """This run's part of the node's private state folder: a second run on the node never
        starts from the first one's personal models, residuals or replicas."""
        return self.state_dir / f"run-{run_key(self.cfg)}"

    def _state_path(self) -> Path:
        return self.run_dir / f"client-{self.client_id}.safetensors"

    def load_state(self, broadcast: dict) -> dict:
        path = self._state_path()
        if not path.exists():
            return self.algorithm.client_init(broadcast)
        return tree.nested_unflatten(dict(load_bytes(path.read_bytes())))

    def save_state(self, state: dict) -> None:
        if state:
            flat = {k: v.contiguous() for k, v in tree.nested_flatten(state).items()}
            write_private(self._state_path(), save_bytes(flat))

    def _residual_path(self) -> Path:
        return self.run_dir / f"client-{self.client_id}-residual.safetensors"

    def load_residual(self):
        """This client's error-feedback residual [D] (float64), or None before its first upload."""
        path = self._residual_path()
        return load_bytes(path.read_bytes())["residual"] if path.exists() else None

    def _replica_path(self) -> Path:
        return self.run_dir / f"client-{self.client_id}-replica.safetensors"

    def load_replica(self):
        """(round, flat replica [D] float32) of the compressed broadcasts (``--compress-down``),
        or None before the first one."""
        path = self._replica_path()
        if not path.exists():
            return None
        stored = load_bytes(path.read_bytes())
        return int(stored["round"]), stored["replica"]

    def save_replica(self, rnd: int, replica) -> None:
        write_private(self._replica_path(), save_bytes({"replica": replica.contiguous(),
                                                       "round": torch.tensor(rnd, dtype=torch.int64)}))

    def save_residual(self, residual) -> None:
        write_private(self._residual_path(), save_bytes({"residual": residual.contiguous()}))


NODE_FILE_TENSORS = ("train_x", "train_y", "test_x", "test_y")


def load_node_file(path, max_bytes: int = 2 ** 31) -> ClientData:
    """A party's own data in metafed's node format: one safetensors file holding
    ``train_x`` [n, ...] (float32, or int64 token ids), ``train_y`` [n] int64 labels,
    ``test_x`` and ``test_y`` likewise. No pickle; every tensor is checked."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise NodeConfigError(f"{path}: {size} bytes, more than the {max_bytes} accepted")
        tensors = dict(load_bytes(path.read_bytes()))
    except NodeConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable or not safetensors: one clear error
        raise NodeConfigError(f"cannot read node data {path}: {type(e).__name__}: {e}") from None
    if set(tensors) != set(NODE_FILE_TENSORS):
        raise NodeConfigError(f"{path} must hold exactly {', '.join(NODE_FILE_TENSORS)}, has {sorted(tensors)}")
    return client_data_from_tensors(*(tensors[k] for k in NODE_FILE_TENSORS), name=str(path))


def client_data_from_tensors(train_x, train_y, test_x, test_y, name: str = "") -> ClientData:
    """Checked ClientData: matching lengths, int64 labels >= 0, finite float inputs, a
    non-empty train and test split, one input shape."""
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if y.dtype != torch.int64 or y.dim() != 1 or (y < 0).any():
            raise NodeConfigError(f"{name}: {split}_y must be a 1-d int64 tensor of labels >= 0")
        if x.shape[:1] != y.shape or len(y) == 0:
            raise NodeConfigError(f"{name}: {split}_x has {x.shape[:1]} rows and {split}_y {tuple(y.shape)}: "
                                  "they must match and be non-empty")
        if x.dtype not in (torch.float32, torch.int64) or (x.is_floating_point() and not torch.isfinite(x).all()):
            raise NodeConfigError(f"{name}: {split}_x must be finite float32 (or int64 tokens)")
    if train_x.shape[1:] != test_x.shape[1:] or train_x.dtype != test_x.dtype:
        raise NodeConfigError(f"{name}: train_x and test_x differ in shape or dtype")
    return ClientData(train_x.contiguous(), train_y.contiguous(), test_x.contiguous(), test_y.contiguous(), name)


def client_data_from_datasets(train, test, name: str = "") -> ClientData:
    """ClientData from two torch ``Dataset``s of (x, y) pairs (y an int label)."""
    def stack(ds, split):
        items = [ds[i] for i in range(len(ds))]
        if not items:
            raise NodeConfigError(f"{name}: the {split} dataset is empty")
        try:
            x = torch.stack([torch.as_tensor(item[0]) for item in items])
            y = torch.tensor([int(item[1]) for item in items], dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError, IndexError) as e:
            raise NodeConfigError(f"{name}: the {split} dataset must yield (x, label) pairs of one shape: {e}") from None
        return (x.float() if x.is_floating_point() else x.long()), y

    return client_data_from_tensors(*stack(train, "train"), *stack(test, "test"), name=name)


def file_node(config_json: str, node_config: dict, model_fn=None) -> Node:
    """A node on the party's own file (node config ``data-file``, ``client-id``, ``num-classes``)."""
    cfg = RunConfig(**json.loads(config_json))
    try:
        cid, classes = int(node_config["client-id"]), int(node_config["num-classes"])
    except (KeyError, TypeError, ValueError):
        raise NodeConfigError("--node-config with data-file needs client-id=K and num-classes=C") from None
    if not 0 <= cid < cfg.num_clients:
        raise NodeConfigError(f"client-id {cid} must be in [0, num_clients={cfg.num_clients})")
    data = load_node_file(node_config["data-file"])
    if int(max(data.train_y.max(), data.test_y.max())) >= classes:
        raise NodeConfigError(f"{node_config['data-file']}: labels reach beyond num-classes={classes}")
    state_dir = private_folder(Path(str(node_config.get("state-dir", default_state_root() / f"client-{cid}"))))
    return Node(cfg, cid, data, tuple(data.train_x.shape[1:]), classes, state_dir, "train", model_fn)


def parse_node_config(node_config: dict) -> tuple[str, int, int]:
    """(dataset, partition id, number of partitions) from a SuperNode's --node-config."""
    try:
        dataset = str(node_config["dataset"])
        pid, parts = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise NodeConfigError("--node-config needs dataset=NAME partition-id=K num-partitions=N") from None
    if not 0 <= pid < parts:
        raise NodeConfigError(f"partition-id {pid} must be in [0, num-partitions={parts})")
    return dataset, pid, parts


@functools.lru_cache(maxsize=4)
def load_node(config_json: str, dataset: str, pid: int, parts: int, state_dir: str, model_fn=None) -> Node:
    """The node's partition of a built-in dataset: the run's config (seed, partitioner) with
    the node's dataset and partition count, so it is exactly the simulation's client from
    partition ``pid`` (a training client, or a held-out one)."""
    cfg = RunConfig(**json.loads(config_json))
    if cfg.dataset != dataset or cfg.num_clients != parts:
        raise NodeConfigError(f"this node holds {dataset} partition {pid} of {parts}, but the run asks for "
                              f"{cfg.dataset} over {cfg.num_clients} clients")
    folder = private_folder(Path(state_dir))  # refused unless private to this user: it holds the node's data
    cached = _partition_cache(cfg, pid, folder)
    if cached.exists():  # Flower starts a process per message: do not re-partition the dataset each time
        try:
            return _read_partition(cfg, cached, folder, model_fn, pid)
        except (NodeConfigError, KeyError, ValueError):
            cached.unlink(missing_ok=True)  # torn, stale or another partition's: rebuild it below
    fed = load_dataset(cfg)
    role, index = fed.role_of_partition(pid)  # held-out partitions (--heldout-fraction) never train
    data = fed.clients[index] if role == "train" else fed.heldout[index]
    node = Node(cfg, index, data, fed.input_shape, fed.num_classes, folder, role, model_fn)
    for old in folder.glob(f"partition-{pid}-*.safetensors"):  # one cache per node: the last config's
        old.unlink(missing_ok=True)
    _write_partition(node, cached, pid)
    return node


def _partition_cache(cfg: RunConfig, pid: int, state_dir: Path) -> Path:
    """Where this node keeps its partition of a built-in dataset for one run config (the
    whole config is hashed: no data-affecting key can be missed)."""
    import hashlib

    digest = hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:24]
    return state_dir / f"partition-{pid}-{digest}.safetensors"


def _write_partition(node: Node, path: Path, pid: int) -> None:
    meta = {"role": node.role, "index": str(node.client_id), "input_shape": json.dumps(list(node.input_shape)),
            "num_classes": str(node.num_classes), "partition": str(pid)}
    tensors = {"train_x": node.data.train_x, "train_y": node.data.train_y, "test_x": node.data.test_x,
               "test_y": node.data.test_y}
    write_private(path, save_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))


def _read_partition(cfg: RunConfig, path: Path, state_dir: Path, model_fn, pid: int) -> Node:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in NODE_FILE_TENSORS}
    if meta.get("partition") != str(pid):
        raise NodeConfigError(f"{path.name} holds partition {meta.get('partition')!r}, not {pid}")
    data = client_data_from_tensors(*(tensors[k] for k in NODE_FILE_TENSORS), name=path.name)
    return Node(cfg, int(meta["index"]), data, tuple(json.loads(meta["input_shape"])), int(meta["num_classes"]),
                state_dir, meta["role"], model_fn)
