"""The native local-SGD kernel (metafed/backends/native) against the torch fused step and the
loop backend: same maths to float rounding, every shape path (row blocks, padding rows,
empty batches, stragglers, the proximal pull), NaN propagation, refused bad input, and the
fallback when no compiler is there."""
import shutil

import numpy as np
import pytest
import torch

from metafed.algorithms.fedavg import ProximalSGD
from metafed.backends import native
from metafed.backends.base import ClientTask
from metafed.backends.fused_mlp import fused_sgd_step
from metafed.backends.loop import LoopBackend
from metafed.backends.vectorized import VectorizedBackend
from metafed.data.schedule import client_schedule
from metafed.models import MLP, FunctionalModel, LogisticRegression

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")


def make_tasks(n_clients, dim, classes, batch, seed, batches_per_step=1):
    """Clients of different sizes (so chunks pad), 3 epochs each, one a straggler."""
    rng = np.random.default_rng(seed)
    tasks = []
    for k in range(n_clients):
        n = int(rng.integers(5, 30))
        x = torch.from_numpy(rng.normal(size=(n, dim)).astype(np.float32))
        y = torch.from_numpy(rng.integers(0, classes, n))
        sched = client_schedule(n, batch_size=batch, epochs=3, steps=None, batches_per_step=batches_per_step, rng=rng)
        active = len(sched) // 2 if k == 1 else len(sched)
        tasks.append(ClientTask(x, y, sched, active, {"num_samples": torch.tensor(float(n))}))
    return tasks


def _problem(dims, clients=5, n=23, batch=13, steps=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = [(torch.randn(clients, o, i, generator=g) * 0.3, torch.randn(clients, o, generator=g) * 0.1)
              for i, o in zip(dims[:-1], dims[1:])]
    x = torch.randn(clients, n, dims[0], generator=g)
    y = torch.randint(0, dims[-1], (clients, n), generator=g)
    rng = np.random.default_rng(seed)
    idx = np.stack([np.stack([rng.permutation(n)[:batch] for _ in range(steps)]) for _ in range(clients)])
    idx[0, 1, [0, 4, 7]] = -1  # padding rows anywhere in a batch, not only at its end
    idx[1, 2, :] = -1  # an empty batch: only the pull moves the weights
    idx[2, -1, 5:] = -1  # a short last batch
    active = torch.tensor([steps, steps, steps, 2, 0][:clients], dtype=torch.int64)  # stragglers, a client with no step
    return layers, x, y, torch.from_numpy(idx), active


def _reference(dims, layers, x, y, idx, active, lr, mu, anchor):
    """Each client alone through the torch fused step (itself tested against vmap(grad))."""
    module = MLP(dims[0], tuple(dims[1:-1]), dims[-1]) if len(dims) > 2 else LogisticRegression(dims[0], dims[1])
    names = [n for n, _ in module.named_parameters()]
    step = fused_sgd_step(ProximalSGD(FunctionalModel(module), lr, mu))
    out, losses = [], []
    for c in range(x.shape[0]):
        params = {n: t[c:c + 1].clone() for n, t in zip(names, [t for pair in layers for t in pair])}
        total = torch.zeros(1)
        for s in range(int(active[c])):
            rows = idx[c, s]
            _, loss = step(params, x[c, rows.clamp_min(0)][None], y[c, rows.clamp_min(0)][None],
                           (rows >= 0).float()[None], {n: a[None] for n, a in zip(names, anchor)} if mu else None)
            total += loss
        out.append([params[n][0] for n in names])
        losses.append(total)
    return out, torch.cat(losses)


@pytest.mark.parametrize("dims", [(7, 33, 17, 5), (9, 4), (60, 200, 10)])
@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_kernel_equals_the_torch_fused_step(dims, mu):
    assert native.library() is not None, "a compiler is here, so the kernel must build"
    layers, x, y, idx, active = _problem(dims)
    anchor = [t[3].clone() for pair in layers for t in pair]  # any fixed params as FedProx's anchor
    want, want_loss = _reference(dims, layers, x, y, idx, active, 0.05, mu, anchor)
    got_loss = native.train_mlp_sgd(layers, x, y, idx, active, 0.05, mu,
                                    list(zip(anchor[0::2], anchor[1::2])) if mu else None)
    for c in range(x.shape[0]):
        for got_t, want_t in zip([t[c] for pair in layers for t in pair], want[c]):
            torch.testing.assert_close(got_t, want_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)


def test_client_without_steps_is_untouched_and_nan_propagates():
    layers, x, y, idx, active = _problem((7, 33, 5))
    before = [t[4].clone() for pair in layers for t in pair]
    x[0, idx[0, 0, 1]] = float("nan")  # client 0 trains on a NaN sample: its weights must say so
    loss = native.train_mlp_sgd(layers, x, y, idx, active, 0.05)
    assert all(torch.equal(t[4], b) for t, b in zip([t for pair in layers for t in pair], before))
    assert loss[4] == 0
    assert torch.isnan(layers[0][0][0]).any() and torch.isnan(loss[0])
    assert torch.isfinite(layers[0][0][1:]).all()


def test_bad_input_is_refused_before_the_kernel_reads_memory():
    layers, x, y, idx, active = _problem((7, 33, 5))
    with pytest.raises(ValueError, match="labels must lie in"):
        native.train_mlp_sgd(layers, x, torch.full_like(y, 5), idx, active, 0.05)
    bad = idx.clone()
    bad[0, 0, 0] = x.shape[1]
    with pytest.raises(ValueError, match="outside the client's data"):
        native.train_mlp_sgd(layers, x, y, bad, active, 0.05)
    with pytest.raises(ValueError, match="do not chain"):
        native.train_mlp_sgd([layers[1], layers[0]], x, y, idx, active, 0.05)


@pytest.mark.parametrize("mu", [0.0, 0.1])
def test_vectorized_backend_with_the_kernel_equals_the_loop_backend(mu):
    model = FunctionalModel(MLP(6, (20, 12), 3))
    program = ProximalSGD(model, 0.1, mu)
    shared = {"params": model.init_params()}
    tasks = make_tasks(n_clients=7, dim=6, classes=3, batch=4, seed=3)
    want, want_loss = LoopBackend().run(program, shared, tasks)
    backend = VectorizedBackend(chunk_size=3)  # several chunks, written back in task order
    assert backend._native_plan(program, shared) is not None
    got, got_loss = backend.run(program, shared, tasks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)


def test_without_a_compiler_the_torch_path_runs(monkeypatch, tmp_path, caplog):
    model = FunctionalModel(MLP(6, (20,), 3))
    program = ProximalSGD(model, 0.1)
    shared = {"params": model.init_params()}
    tasks = make_tasks(n_clients=4, dim=6, classes=3, batch=4, seed=1)
    want, _ = VectorizedBackend().run(program, shared, tasks)
    monkeypatch.setattr(native, "_library", native._UNSET)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level("WARNING"):
        assert native.library() is None
        assert VectorizedBackend()._native_plan(program, shared) is None
        got, _ = VectorizedBackend().run(program, shared, tasks)
    assert "no C compiler" in caplog.text
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(native, "_library", native._UNSET)
    monkeypatch.setenv("METAFED_NATIVE", "0")
    assert native.library() is None


def test_builds_into_an_empty_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_library", native._UNSET)
    monkeypatch.setenv("METAFED_NATIVE_CACHE", str(tmp_path / "cache"))
    assert native.library() is not None
    built = list((tmp_path / "cache").glob("sgd_mlp-*.so"))
    assert len(built) == 1 and not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # no build leftovers


def _with_personal_models(seed):
    """A small MLP, its params as the broadcast, and 5 clients holding a perturbed copy as
    their personal model (Ditto's and pFedMe's client state)."""
    model = FunctionalModel(MLP(6, (20,), 3))
    g = torch.Generator().manual_seed(seed)
    shared = {"params": model.init_params()}
    personal = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in shared["params"].items()}
    tasks = [ClientTask(t.x, t.y, t.schedule, t.active_steps, {**t.inputs, "state": {"personal": personal}})
             for t in make_tasks(n_clients=5, dim=6, classes=3, batch=4, seed=seed)]
    return model, shared, tasks


def test_ditto_both_models_run_natively_and_equal_the_loop_backend():
    from metafed.algorithms.ditto import DittoPersonalize, DittoProgram

    model, shared, tasks = _with_personal_models(5)
    for program in (DittoProgram(model, 0.1, 0.05, 0.5), DittoPersonalize(model, 0.05, 0.5)):
        backend = VectorizedBackend(chunk_size=2)
        assert backend._native_plan(program, shared) is not None
        got, got_loss = backend.run(program, shared, tasks)
        want, want_loss = LoopBackend().run(program, shared, tasks)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flatten", [True, False])
def test_a_users_sequential_mlp_takes_the_fast_paths(flatten):
    from torch import nn

    from metafed.backends.fused_mlp import sgd_mlp_plan

    torch.manual_seed(0)
    layers = [nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 12), nn.ReLU(inplace=True), nn.Linear(12, 3)]
    model = FunctionalModel(nn.Sequential(*([nn.Flatten()] if flatten else []), *layers))
    program = ProximalSGD(model, 0.1, 0.05)
    plan = sgd_mlp_plan(program)
    first = "1" if flatten else "0"
    assert plan is not None and plan.layers[0] == (f"{first}.weight", f"{first}.bias")
    assert plan.flat_input_only is not flatten
    # the torch fused step flattens whatever it gets, so it takes only modules that flatten too
    assert (fused_sgd_step(program) is not None) is flatten
    shared = {"params": model.init_params()}
    tasks = make_tasks(n_clients=4, dim=6, classes=3, batch=4, seed=4)
    backend = VectorizedBackend()
    assert backend._native_plan(program, shared) is not None
    got, got_loss = backend.run(program, shared, tasks)
    want, want_loss = LoopBackend().run(program, shared, tasks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)


def test_other_modules_keep_the_generic_step():
    from torch import nn

    from metafed.backends.fused_mlp import sgd_mlp_plan

    for module in (nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)),  # not ReLU
                   nn.Sequential(nn.Linear(6, 3, bias=False)),  # no bias
                   nn.Sequential(nn.Linear(6, 5), nn.ReLU()),  # ends in an activation
                   nn.Sequential(nn.Flatten(0), nn.Linear(6, 3)),  # flattens the batch dimension too
                   nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.LogSoftmax(-1))):
        assert sgd_mlp_plan(ProximalSGD(FunctionalModel(module), 0.1)) is None, module


@pytest.mark.parametrize("name,inner_steps", [("fomaml", 1), ("fomaml", 3), ("per-fedavg-fo", 1)])
def test_first_order_meta_steps_run_natively_and_equal_the_loop_backend(name, inner_steps):
    from metafed.algorithms.maml import MAMLProgram
    from metafed.algorithms.per_fedavg import PerFedAvgProgram

    model = FunctionalModel(MLP(6, (20, 12), 3))
    program = (MAMLProgram(model, 0.2, 0.1, inner_steps, first_order=True) if name == "fomaml"
               else PerFedAvgProgram(model, 0.2, 0.1))
    shared = {"params": model.init_params()}
    tasks = make_tasks(n_clients=6, dim=6, classes=3, batch=5, seed=7, batches_per_step=2)
    backend = VectorizedBackend(chunk_size=4)
    plan = backend._native_plan(program, shared)
    assert plan is not None and plan.meta is not None and plan.meta.inner_steps == inner_steps
    got, got_loss = backend.run(program, shared, tasks)
    want, want_loss = LoopBackend().run(program, shared, tasks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)


def test_second_order_steps_keep_the_generic_path():
    from metafed.algorithms.maml import MAMLProgram
    from metafed.algorithms.per_fedavg import PerFedAvgProgram

    from metafed.backends.fused_mlp import sgd_mlp_plan

    model = FunctionalModel(MLP(6, (20,), 3))
    assert sgd_mlp_plan(MAMLProgram(model, 0.2, 0.1, 1, first_order=False)) is None
    assert sgd_mlp_plan(PerFedAvgProgram(model, 0.2, 0.1, hessian_free=True)) is None


def test_meta_step_with_an_empty_support_batch_adapts_nothing():
    from metafed.algorithms.maml import MAMLProgram

    model = FunctionalModel(MLP(6, (20,), 3))
    program = MAMLProgram(model, 0.2, 0.1, 2, first_order=True)
    shared = {"params": model.init_params()}
    tasks = make_tasks(n_clients=3, dim=6, classes=3, batch=5, seed=8, batches_per_step=2)
    schedule = tasks[0].schedule.copy()
    schedule[1, 0] = -1  # step 1: no support sample, so temp = w and the query gradient is taken at w
    schedule[2, 1, 2:] = -1  # step 2: a short query batch
    tasks[0] = ClientTask(tasks[0].x, tasks[0].y, schedule, tasks[0].active_steps, tasks[0].inputs)
    got, got_loss = VectorizedBackend().run(program, shared, tasks)
    want, want_loss = LoopBackend().run(program, shared, tasks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("personal_lr,inner_steps", [(0.05, 3), (0.05, 1), (1.5, 2)])
def test_pfedme_runs_natively_and_equals_the_loop_backend(personal_lr, inner_steps):
    from metafed.algorithms.pfedme import PFedMePersonalize, PFedMeProgram

    model, shared, tasks = _with_personal_models(9)
    # personal_lr 1.5: the solve overshoots, so its objective rises and the step says so
    for program in (PFedMeProgram(model, 0.1, personal_lr, 0.5, inner_steps),
                    PFedMePersonalize(model, personal_lr, 0.5, inner_steps)):
        backend = VectorizedBackend(chunk_size=2)
        assert backend._native_plan(program, shared).moreau is not None
        got, got_loss = backend.run(program, shared, tasks)
        want, want_loss = LoopBackend().run(program, shared, tasks)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
        if "metrics" in want:
            assert bool(want["metrics"]["inner_increase"].any()) is (personal_lr > 1)
