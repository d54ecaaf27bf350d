"""One source of truth for options: the config is a tree of sections declared beside their
components; every field keeps a flat name that is a `metafed run` flag with its help and
default; algorithm parameters live in the chosen algorithm's own section, so another
algorithm's setting cannot be written; `metafed config show` and config.yaml print the tree,
which loads back to the same config, and flat files of older run folders still load."""
import json

import pytest
import typer
import yaml
from typer.testing import CliRunner

from metafed.cli import app
from metafed.config import ConfigError, RunConfig, build_config
from metafed.config.aliases import ALGORITHM_KEYS, KEYS, default_of
from metafed.config.show import tree_dump
from metafed.config.tree import ALGORITHM_SECTIONS, SECTIONS

runner = CliRunner()


def _run_params() -> dict:
    command = typer.main.get_command(app).commands["run"]
    return {p.name: p for p in command.params}


def test_every_config_key_is_a_flag_with_its_help_and_default():
    params = _run_params()
    for key, spec in KEYS.items():
        field = spec.field
        assert key in params, f"config key {key} has no flag"
        param = params[key]
        assert field.description and param.help.startswith(field.description), key
        assert param.show_default not in (None, False, ""), key
        assert param.default is None, f"{key}: a flag must default to 'not given' so the YAML file applies"
    assert params["lr"].show_default == "0.1" and params["hidden"].show_default == "200"
    assert params["dataset"].help.endswith("(digits | mnist | femnist | shakespeare | synthetic | w1)")


def test_every_key_is_in_exactly_one_section_and_algorithm_sections_match_the_registry():
    from metafed.algorithms import ALGORITHMS

    assert set(ALGORITHM_SECTIONS) == set(ALGORITHMS)
    assert set(RunConfig.model_fields) == {"algorithm", *SECTIONS}
    paths = [spec.path for spec in KEYS.values() if spec.path]
    assert len(paths) == len(set(paths)), "two flat keys name one field"
    in_sections = {k for k, spec in KEYS.items() if spec.path and k != "algorithm"}
    assert not in_sections & set(ALGORITHM_KEYS), "a flat key both in a section and an algorithm's"
    assert len(KEYS) == 134  # every flat key of the former flat config, no more, no fewer


def test_the_tree_reads_as_the_flat_keys_did():
    cfg = build_config(dp="central", dp_clip=0.5, dp_noise_multiplier=1.0, secure_aggregation=True, rounds=7,
                       algorithm="pfedme", pfedme_lambda=12, seed=3)
    assert cfg.privacy.dp.clip == cfg.dp_clip == 0.5 and cfg.privacy.secagg.enabled and cfg.training.rounds == 7
    assert cfg.algorithm.name == "pfedme" and cfg.algorithm.lam == cfg.pfedme_lambda == 12
    assert cfg.ditto_lambda == default_of("ditto_lambda")  # another algorithm's key reads as its default
    assert cfg.given_keys() == {"dp", "dp_clip", "dp_noise_multiplier", "secure_aggregation", "rounds", "algorithm",
                                "pfedme_lambda", "seed"}
    assert RunConfig(**cfg.model_dump(mode="json", by_alias=True)) == cfg
    assert RunConfig(**cfg.flat_values()) == cfg


def test_another_algorithms_key_cannot_be_written_in_the_tree():
    with pytest.raises(ConfigError, match="'fedavg' has no parameter 'lambda'"):
        build_config(algorithm={"name": "fedavg", "lambda": 1})
    with pytest.raises(ConfigError, match="unknown config key privacy.dp.sigma"):
        build_config(privacy={"dp": {"sigma": 1.0}})
    with pytest.raises(ConfigError, match="dp_clip is given twice"):
        build_config(privacy={"dp": {"clip": 1.0}}, dp_clip=2.0)


def test_nested_algorithm_equals_flat_and_mistakes_are_named():
    nested = build_config(algorithm={"name": "pfedme", "lambda": 12, "steps": 3, "personal_lr": 0.05})
    flat = build_config(algorithm="pfedme", pfedme_lambda=12, pfedme_steps=3, personal_lr=0.05)
    assert nested == flat
    with pytest.raises(ConfigError, match="'fedavg' has no parameter 'lambda'"):
        build_config(algorithm={"name": "fedavg", "lambda": 1})
    with pytest.raises(ConfigError, match="needs `name:`"):
        build_config(algorithm={"lambda": 1})
    with pytest.raises(ConfigError, match="given twice"):
        build_config(algorithm={"name": "ditto", "lambda": 1.0}, ditto_lambda=2.0)


@pytest.mark.parametrize("key", sorted(ALGORITHM_KEYS))
def test_another_algorithms_setting_is_refused(key):
    """A key only some algorithms read, set for one that does not, would be silently ignored."""
    values = {"mu": 0.5, "reptile_anneal": True, "inner_lr": 0.2, "inner_steps": 3, "stage1_rounds": 2,
              "stage1_epochs": 2, "stage2_server_optimizer": "adam", "stage2_server_lr": 0.5, "personal_lr": 0.01,
              "pfedme_lambda": 10.0, "pfedme_steps": 3, "ditto_lambda": 1.0, "meta_alpha": 0.5, "meta_lr": 0.2,
              "meta_mix": 0.2, "meta_val_period": 3, "meta_order": "second", "meta_formulation": "learned-step",
              "local_optimizer": "adam", "local_momentum": 0.5, "client_models": "mlp:0.5,logistic:0.5",
              "public_data": "mnist", "public_size": 300, "public_subset": 50, "digest_epochs": 2, "distill_lr": 0.01,
              "distill_steps": 20, "distill_batch_size": 32, "distill_temperature": 2.0, "distill_weight": 0.5}
    outsider = next(name for name in ALGORITHM_SECTIONS if name not in ALGORITHM_KEYS[key])
    value = values[key] if values[key] != default_of(key) else "delta"
    with pytest.raises(ConfigError, match=f"--{key.replace('_', '-')} is a setting of .*'{outsider}' ignores it"):
        build_config(algorithm=outsider, **{key: value})
    owner = next(iter(ALGORITHM_KEYS[key]))
    extra = {"meta_order": {"meta_formulation": "learned-step"},
             "local_momentum": {"local_optimizer": "momentum"}}.get(key, {})
    assert getattr(build_config(algorithm=owner, **{key: value}, **extra), key) == value


@pytest.mark.parametrize("algorithm", sorted(ALGORITHM_SECTIONS))
def test_config_show_loads_back_to_the_same_config(tmp_path, algorithm):
    own = {"mu": 0.1} if algorithm == "fedprox" else {}  # fedprox refuses mu = 0
    res = runner.invoke(app, ["config", "show", "--algorithm", algorithm, "--protocol", "paper", "--rounds", "7",
                              "--hidden", "32,16", *[f"--{k}={v}" for k, v in own.items()]])
    assert res.exit_code == 0, res.output
    assert "# paper: " in res.output and "algorithm:\n  name: " + algorithm in res.output
    assert "training:\n" in res.output and "  rounds: 7  # communication rounds [set]" in res.output
    (tmp_path / "c.yaml").write_text(res.output)
    shown = build_config(tmp_path / "c.yaml")
    assert shown == build_config(algorithm=algorithm, protocol="paper", rounds=7, hidden=[32, 16], **own)
    assert build_config(**tree_dump(shown)) == shown


def test_run_folder_config_is_the_tree_and_rewritten_on_resume(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--algorithm", "ditto", "--ditto-lambda", "0.5", "--rounds", "1", "--num-clients", "4",
            "--clients-per-round", "2", "--local-steps", "1", "--eval-clients", "2", "--out", str(out), "-q"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["algorithm"] == {"name": "ditto", "lambda": 0.5, "personal_lr": None}
    assert "pfedme_lambda" not in saved and "mu" not in saved and set(saved) == {"algorithm", *SECTIONS}
    res = runner.invoke(app, ["run", "--resume", str(out), "--rounds", "2", "--eval-every", "2", "-q"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["rounds"] == 2
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


def test_verbose_and_quiet_and_list_flags():
    res = runner.invoke(app, ["run", "-v", "-q", "--out", "x"])
    assert res.exit_code == 2 and "choose one" in res.output
    res = runner.invoke(app, ["config", "show", "--hidden", "64,x"])
    assert res.exit_code == 2 and "--hidden expects integers" in res.output


def test_a_model_that_does_not_fit_the_dataset_is_refused():
    for dataset in ("digits", "mnist", "synthetic", "femnist"):
        with pytest.raises(ConfigError, match="model 'lstm' reads character sequences"):
            build_config(dataset=dataset, model="lstm")
    with pytest.raises(ConfigError, match="shakespeare' is text"):
        build_config(dataset="shakespeare", model="mlp")


def test_an_older_run_folders_flat_config_still_loads(tmp_path):
    """Run folders written before the tree hold every flat key (other algorithms' at their
    defaults, the algorithm's own under ``algorithm:``): they load to the same config."""
    cfg = build_config(algorithm="ditto", ditto_lambda=0.5, rounds=3, dp="local", dp_noise_multiplier=0.3)
    flat = {key: default_of(key) for key in KEYS if key not in ALGORITHM_KEYS}
    flat.update({k: v for k, v in cfg.flat_values().items() if k in KEYS and KEYS[k].path})
    flat.update({k: default_of(k) for k in ALGORITHM_KEYS if "ditto" not in ALGORITHM_KEYS[k]})  # others' defaults
    flat["algorithm"] = {"name": "ditto", "lambda": 0.5, "personal_lr": None}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(flat, default=str))))
    assert build_config(tmp_path / "config.yaml") == cfg


def test_the_alias_table_refuses_a_flat_name_given_to_two_fields(monkeypatch):
    from pydantic import Field

    from metafed.config import aliases
    from metafed.section import Section

    class Clash(Section):
        TITLE = "Clash"
        FLAT = {"other": "dp_clip"}
        other: float = Field(1.0, description="a second field claiming dp_clip")

    monkeypatch.setitem(aliases.SECTIONS, "clash", Clash)
    with pytest.raises(TypeError, match="config key 'dp_clip' is both privacy.dp.clip and clash.other"):
        aliases._build()


def test_the_readmes_config_example_loads(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("- **Config**", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    (tmp_path / "run.yaml").write_text(block)
    cfg = build_config(tmp_path / "run.yaml")
    assert cfg.algorithm.name == "pfedme" and cfg.pfedme_lambda == 15 and cfg.rounds == 200 and cfg.dp_clip == 0.5
