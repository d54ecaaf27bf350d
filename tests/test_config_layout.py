"""One source of truth for options: every config key is a `metafed run` flag with its help and
default; algorithm parameters are grouped under `algorithm:`; another algorithm's setting is
refused; `metafed config show` prints YAML that loads back to the same config."""
import json

import pytest
import typer
import yaml
from typer.testing import CliRunner

from metafed.cli import app
from metafed.config import ConfigError, RunConfig, build_config
from metafed.config_layout import ALGORITHM_PARAMS, KEY_OWNERS, SECTIONS, grouped_config

runner = CliRunner()


def _run_params() -> dict:
    command = typer.main.get_command(app).commands["run"]
    return {p.name: p for p in command.params}


def test_every_config_key_is_a_flag_with_its_help_and_default():
    params = _run_params()
    for key, field in RunConfig.model_fields.items():
        assert key in params, f"config key {key} has no flag"
        param = params[key]
        assert field.description and param.help.startswith(field.description), key
        assert param.show_default not in (None, False, ""), key
        assert param.default is None, f"{key}: a flag must default to 'not given' so the YAML file applies"
    assert params["lr"].show_default == "0.1" and params["hidden"].show_default == "200"
    assert params["dataset"].help.endswith("(digits | mnist | femnist | shakespeare | synthetic | w1)")


def test_every_key_is_in_exactly_one_section_and_algorithm_params_match_the_registry():
    from metafed.algorithms import ALGORITHMS

    assert set(ALGORITHM_PARAMS) == set(ALGORITHMS)
    listed = [k for keys in SECTIONS.values() for k in keys] + list(KEY_OWNERS) + ["algorithm"]
    assert sorted(listed) == sorted(RunConfig.model_fields), "SECTIONS + algorithm parameters must list each key once"


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


@pytest.mark.parametrize("key", sorted(KEY_OWNERS))
def test_another_algorithms_setting_is_refused(key):
    """A key only some algorithms read, set for one that does not, would be silently ignored."""
    values = {"mu": 0.5, "reptile_anneal": True, "inner_lr": 0.2, "inner_steps": 3, "stage1_rounds": 2,
              "stage1_epochs": 2, "stage2_server_optimizer": "adam", "stage2_server_lr": 0.5, "personal_lr": 0.01,
              "pfedme_lambda": 10.0, "pfedme_steps": 3, "ditto_lambda": 1.0, "meta_alpha": 0.5, "meta_lr": 0.2,
              "meta_mix": 0.2, "meta_val_period": 3, "meta_order": "second", "meta_formulation": "learned-step",
              "local_optimizer": "adam", "local_momentum": 0.5, "client_models": "mlp:0.5,logistic:0.5",
              "public_data": "mnist", "public_size": 300, "public_subset": 50, "digest_epochs": 2, "distill_lr": 0.01,
              "distill_steps": 20, "distill_batch_size": 32, "distill_temperature": 2.0, "distill_weight": 0.5}
    outsider = next(name for name in ALGORITHM_PARAMS if name not in KEY_OWNERS[key])
    value = values[key] if values[key] != RunConfig.model_fields[key].default else "delta"
    with pytest.raises(ConfigError, match=f"--{key.replace('_', '-')} is a setting of .*'{outsider}' ignores it"):
        build_config(algorithm=outsider, **{key: value})
    owner = KEY_OWNERS[key][0]
    extra = {"meta_order": {"meta_formulation": "learned-step"},
             "local_momentum": {"local_optimizer": "momentum"}}.get(key, {})
    assert getattr(build_config(algorithm=owner, **{key: value}, **extra), key) == value


@pytest.mark.parametrize("algorithm", sorted(ALGORITHM_PARAMS))
def test_config_show_loads_back_to_the_same_config(tmp_path, algorithm):
    own = {"mu": 0.1} if algorithm == "fedprox" else {}  # fedprox refuses mu = 0
    res = runner.invoke(app, ["config", "show", "--algorithm", algorithm, "--protocol", "paper", "--rounds", "7",
                              "--hidden", "32,16", *[f"--{k}={v}" for k, v in own.items()]])
    assert res.exit_code == 0, res.output
    assert "# paper: " in res.output and "algorithm:\n  name: " + algorithm in res.output
    assert "rounds: 7  # communication rounds [set]" in res.output
    (tmp_path / "c.yaml").write_text(res.output)
    shown = build_config(tmp_path / "c.yaml")
    assert shown == build_config(algorithm=algorithm, protocol="paper", rounds=7, hidden=[32, 16], **own)
    assert build_config(**grouped_config(shown)) == shown


def test_run_folder_config_is_grouped_and_rewritten_on_resume(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--algorithm", "ditto", "--ditto-lambda", "0.5", "--rounds", "1", "--num-clients", "4",
            "--clients-per-round", "2", "--local-steps", "1", "--eval-clients", "2", "--out", str(out), "-q"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["algorithm"] == {"name": "ditto", "lambda": 0.5, "personal_lr": None}
    assert "pfedme_lambda" not in saved and "mu" not in saved
    res = runner.invoke(app, ["run", "--resume", str(out), "--rounds", "2", "--eval-every", "2", "-q"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((out / "config.yaml").read_text())["rounds"] == 2
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
