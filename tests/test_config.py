"""Config composition, overrides, and one clear line for each kind of bad input."""

import pytest
from omegaconf import OmegaConf

from ppo_cli.cli.overrides import check_overrides
from ppo_cli.config import validate
from ppo_cli.envs.make import make_vec_env
from ppo_cli.errors import UserError
from ppo_cli.policy.actor_critic import settle_network

from .conftest import cli, make_cfg

SOURCE_TABLE = dict(gamma=0.99, clip_range=0.1, gae_lambda=0.9, K_epochs=3, n_steps=1024, batch_size=64,
                    lr_actor=3e-4, lr_critic=3e-4, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5,
                    total_timesteps=1_000_000, optimizer="adam")


def test_defaults_are_the_source_table():
    cfg = make_cfg()
    for key, value in SOURCE_TABLE.items():
        assert cfg.algo[key] == value, key
    # network=auto: the encoder and its defaults are decided from the env's observations (CartPole: vectors).
    assert cfg.network.type == "auto" and cfg.network.net_arch is None and cfg.network.shared_trunk is None
    assert settle_network(cfg) == "no image in the observations"
    assert cfg.network.type == "mlp" and list(cfg.network.net_arch) == [64, 64] and cfg.network.shared_trunk is False
    assert cfg.network.activation_fn == "tanh"
    assert cfg.network.init == "orthogonal" and cfg.network.bias == 0.0
    assert cfg.env.id == "CartPole-v1" and cfg.env.num_envs == 8
    validate(cfg)


def test_groups_and_overrides_compose():
    cfg = make_cfg("env=Acrobot-v1", "network=mlp_large", "algo.lr_actor=1e-4", "seed=3")
    assert cfg.env.id == "Acrobot-v1" and list(cfg.network.net_arch) == [256, 256]
    assert cfg.algo.lr_actor == 1e-4 and cfg.seed == 3
    cfg = make_cfg("env.id=MountainCar-v0", "env.num_envs=16")
    assert cfg.env.id == "MountainCar-v0" and cfg.env.num_envs == 16


@pytest.mark.parametrize("preset", ["CartPole-v1", "Acrobot-v1", "MountainCar-v0", "LunarLander-v3"])
def test_env_presets_compose_and_validate(preset):
    cfg = make_cfg(f"env={preset}")
    assert cfg.env.id == preset
    validate(cfg)


@pytest.mark.parametrize("overrides,fragment", [
    (["algo.gamma=1.5"], "algo.gamma=1.5: must be in (0, 1]"),
    (["algo.gamma=0"], "algo.gamma=0.0: must be in (0, 1]"),
    (["algo.gae_lambda=-0.1"], "algo.gae_lambda=-0.1: must be in [0, 1]"),
    (["algo.clip_range=0"], "algo.clip_range=0.0: must be > 0"),
    (["algo.lr_actor=0"], "algo.lr_actor=0.0: must be > 0"),
    (["algo.lr_critic=-1e-3"], "algo.lr_critic=-0.001: must be > 0"),
    (["algo.K_epochs=0"], "algo.K_epochs=0: must be >= 1"),
    (["algo.n_steps=0"], "algo.n_steps=0: must be >= 1"),
    (["algo.batch_size=100000"], "larger than the rollout"),
    (["algo.batch_size=100"], "must divide the rollout"),
    (["network.net_arch=[]"], "network.net_arch"),
    (["eval.max_episode_steps=0"], "eval.max_episode_steps=0: must be >= 1"),
])
def test_out_of_range_values_are_named(overrides, fragment):
    with pytest.raises(UserError, match="invalid config") as err:
        validate(make_cfg(*overrides))
    assert fragment in str(err.value)


@pytest.mark.parametrize("arg,fragment", [
    ("algo.clip_rang=0.2", "unknown config key 'algo.clip_rang' (did you mean 'algo.clip_range'?)"),
    ("algo.gamma=abc", "algo.gamma=abc: Value 'abc' of type 'str' could not be converted to Float"),
    ("algo.total_timesteps=1e5", "must be an integer"),
    ("algo.optimizer=sgd", "expected one of [adam, adamw]"),
    ("network.activation_fn=gelu", "expected one of [tanh, relu, leaky_relu]"),
])
def test_unknown_keys_and_wrong_types(arg, fragment):
    with pytest.raises(UserError) as err:
        check_overrides([arg])
    assert fragment in str(err.value)


def test_valid_overrides_pass_the_precheck():
    check_overrides(["algo.clip_range=0.2", "env=Acrobot-v1", "env.kwargs.foo=1", "hydra.run.dir=x", "seed=1,2"])


def test_unknown_env_suggests_close_ids():
    with pytest.raises(UserError, match=r"not a registered gymnasium environment; did you mean CartPole-v1"):
        make_vec_env(make_cfg("env.id=CartPol-v1").env, seed=0)


def test_unsupported_action_space():
    with pytest.raises(UserError, match=r"action space Dict.* is not supported \(supported: Discrete, Box, "
                       r"MultiDiscrete, MultiBinary\)"):
        make_vec_env(make_cfg("env.entry_point=tests.custom_env:DictActions").env, seed=0)


@pytest.mark.parametrize("args,fragment", [
    (["algo.clip_rang=0.2"], "unknown config key 'algo.clip_rang'"),
    (["algo.gamma=1.5"], "algo.gamma=1.5: must be in (0, 1]"),
    (["algo.batch_size=100"], "must divide the rollout"),
    (["env.id=CartPol-v1"], "did you mean CartPole-v1"),
    (["env.entry_point=tests.custom_env:DictActions"], "action space Dict('move': Discrete(2)) is not supported"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, fragment):
    proc = cli("ppo-train", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ppo-train: error:") and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_group_option_lists_the_presets(tmp_path):
    proc = cli("ppo-train", "env=Foo", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "Could not find 'env/Foo'" in proc.stderr and "CartPole-v1" in proc.stderr


def test_resolved_config_round_trips_through_yaml():
    cfg = make_cfg("algo.target_kl=0.02")
    again = OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True))
    assert again.algo.target_kl == 0.02 and again.algo.optimizer == "adam"


def test_docs_key_tables_are_generated_from_the_schema_and_list_every_key():
    """docs/configuration.md's key tables are config.key_tables() (the defaults and help of the dataclasses), and
    every key of the schema has a row: a new key without help, or a stale table, fails."""
    import re
    from pathlib import Path

    from omegaconf import OmegaConf

    from ppo_cli.config import DOCS_BEGIN, DOCS_END, TrainConfig, key_tables

    docs = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    block = docs.split(DOCS_BEGIN, 1)[1].split(DOCS_END, 1)[0]
    assert block.strip() == key_tables().strip(), "stale: run python -m ppo_cli.config docs/configuration.md"
    cfg = OmegaConf.structured(TrainConfig)
    keys = {f"{group}.{key}" for group in ("algo", "network", "env", "eval", "doctor", "tune", "logger.wandb",
                                                    "logger.mlflow")
            for key in OmegaConf.select(cfg, group)}
    keys |= {f"logger.{key}" for key in ("backends", "strict")}
    keys |= {key for key in cfg if key not in ("algo", "network", "env", "eval", "doctor", "tune", "logger")}
    assert keys == set(re.findall(r"^\| `([A-Za-z_.0-9]+)` \|", block, re.MULTILINE))


def test_presets_list_only_what_they_change():
    """Every preset value differs from the schema's default (env presets keep their id): one source for defaults."""
    from pathlib import Path

    import yaml
    from omegaconf import OmegaConf

    from ppo_cli.config import TrainConfig

    base = OmegaConf.to_container(OmegaConf.structured(TrainConfig), enum_to_str=True)
    conf = Path(__file__).resolve().parents[1] / "ppo_cli" / "conf"
    for group in ("algo", "network", "env"):
        for path in (conf / group).glob("*.yaml"):
            data = yaml.safe_load(path.read_text()) or {}
            sections = data if path.read_text().startswith("# @package _global_") else {group: data}
            for section, values in sections.items():
                if section == "defaults":  # a preset built on another (mappo on ippo)
                    continue
                for key, value in values.items():
                    if (section, key) not in (("env", "id"), ("network", "type")):
                        assert value != base[section][key], f"{path.name}: {section}.{key} repeats the default"
