"""Structured configs (the schema Hydra validates types and key names against) and range checks.

Hydra rejects unknown keys and wrong types while composing, because every group is backed by one of the
dataclasses below. What a type cannot say (ranges, batch sizes that fit the rollout, env ids) is checked by
`validate`, which returns every problem as a sentence naming the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ppo_cli.errors import UserError

GROUPS = ("algo", "network", "env")


class OptimizerName(str, Enum):
    adam = "adam"
    adamw = "adamw"


class Schedule(str, Enum):
    constant = "constant"
    linear = "linear"


class Activation(str, Enum):
    tanh = "tanh"
    relu = "relu"
    leaky_relu = "leaky_relu"


class EncoderType(str, Enum):
    mlp = "mlp"


class Init(str, Enum):
    orthogonal = "orthogonal"
    xavier = "xavier"
    kaiming = "kaiming"


class Vectorization(str, Enum):
    sync = "sync"
    async_ = "async"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class AlgoConfig:
    gamma: float = 0.99
    clip_range: float = 0.1
    gae_lambda: float = 0.9
    K_epochs: int = 3
    n_steps: int = 1024
    batch_size: int = 64
    lr_actor: float = 3e-4
    lr_critic: float = 3e-4
    lr_schedule: Schedule = Schedule.constant
    ent_coef: float = 0.01
    ent_schedule: Schedule = Schedule.constant
    ent_coef_final: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    total_timesteps: int = 1_000_000
    optimizer: OptimizerName = OptimizerName.adam
    weight_decay: float = 0.0
    eps: float = 1e-5
    normalize_advantage: bool = True
    target_kl: float | None = None
    clip_range_vf: float | None = None


@dataclass
class NetworkConfig:
    type: EncoderType = EncoderType.mlp
    net_arch: list[int] = field(default_factory=lambda: [64, 64])
    activation_fn: Activation = Activation.tanh
    init: Init = Init.orthogonal
    bias: float = 0.0
    shared_trunk: bool = False
    log_std_init: float = 0.0  # Box actions: initial log std of the Gaussian (0.0: std 1)


@dataclass
class EnvConfig:
    id: str = "CartPole-v1"
    num_envs: int = 8
    vectorization: Vectorization = Vectorization.sync
    entry_point: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    wrappers: list[Any] = field(default_factory=list)
    check: bool = False
    max_episode_steps: int | None = None
    normalize_obs: bool = False
    clip_obs: float = 10.0
    normalize_reward: bool = False
    clip_reward: float = 10.0


class Objective(str, Enum):
    final = "final"
    best = "best"
    train = "train"


@dataclass
class EvalConfig:
    every_steps: int = 50_000
    episodes: int = 10
    deterministic: bool = True
    final: bool = True
    stop_at_return: float | None = None
    objective: Objective = Objective.final
    train_window: int = 100  # objective 'train': mean return of this many last training episodes


@dataclass
class TrainConfig:
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 1
    device: Device = Device.auto
    torch_threads: int = 1
    fast_rollout: bool = True  # act in numpy where the policy allows it (CPU, plain MLP); false: always torch
    fast_update: bool = True  # loss and gradients in numpy where the policy allows it (CPU); false: autograd
    torch_compile: bool = False  # torch.compile the autograd loss (where the numpy update path does not run)
    log_interval: int = 1
    checkpoint_interval: int = 10
    resume: str | None = None


def choice(value: Any) -> str:
    """The plain string of an enum-typed config value (str() of a str-Enum gives 'Class.member')."""
    return value.value if isinstance(value, Enum) else str(value)


def config_from_yaml(text: str) -> DictConfig:
    """A run config stored in a checkpoint, typed by the schema (keys it lacks take today's defaults)."""
    try:
        return OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(text))  # type: ignore[return-value]
    except Exception as exc:  # noqa: BLE001 - any OmegaConf validation error means the same thing here
        raise UserError(f"the checkpoint's config does not fit this ppo-cli version "
                        f"({str(exc).strip().splitlines()[0]})") from None


def register_configs() -> None:
    """Back conf/config.yaml with the schema; its defaults list `base_config` first."""
    ConfigStore.instance().store(name="base_config", node=TrainConfig)


def _problems(cfg: DictConfig) -> list[str]:
    a, n, e = cfg.algo, cfg.network, cfg.env
    out: list[str] = []

    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            value = OmegaConf.select(cfg, key)
            shown = repr(choice(value)) if isinstance(value, Enum) else repr(value)
            out.append(f"{key}={shown}: {rule}")

    finite = ("gamma", "clip_range", "gae_lambda", "lr_actor", "lr_critic", "ent_coef", "vf_coef")
    for k in finite:
        need(math.isfinite(a[k]), f"algo.{k}", "must be a finite number")
    need(0.0 < a.gamma <= 1.0, "algo.gamma", "must be in (0, 1]")
    need(0.0 <= a.gae_lambda <= 1.0, "algo.gae_lambda", "must be in [0, 1]")
    need(a.clip_range > 0, "algo.clip_range", "must be > 0")
    need(a.clip_range_vf is None or a.clip_range_vf > 0, "algo.clip_range_vf", "must be > 0 or null")
    need(a.lr_actor > 0, "algo.lr_actor", "must be > 0")
    need(a.lr_critic > 0, "algo.lr_critic", "must be > 0")
    need(a.K_epochs >= 1, "algo.K_epochs", "must be >= 1")
    need(a.n_steps >= 1, "algo.n_steps", "must be >= 1")
    need(a.batch_size >= 1, "algo.batch_size", "must be >= 1")
    need(a.ent_coef >= 0, "algo.ent_coef", "must be >= 0")
    need(a.ent_coef_final >= 0, "algo.ent_coef_final", "must be >= 0")
    need(a.vf_coef >= 0, "algo.vf_coef", "must be >= 0")
    need(a.max_grad_norm > 0, "algo.max_grad_norm", "must be > 0")
    need(a.total_timesteps >= 1, "algo.total_timesteps", "must be >= 1")
    need(a.weight_decay >= 0, "algo.weight_decay", "must be >= 0")
    need(a.eps > 0, "algo.eps", "must be > 0")
    need(a.target_kl is None or a.target_kl > 0, "algo.target_kl", "must be > 0 or null")
    need(len(n.net_arch) >= 1 and all(w >= 1 for w in n.net_arch), "network.net_arch",
         "must list at least one layer width, each >= 1")
    need(e.num_envs >= 1, "env.num_envs", "must be >= 1")
    need(e.clip_obs > 0, "env.clip_obs", "must be > 0")
    need(e.clip_reward > 0, "env.clip_reward", "must be > 0")
    need(math.isfinite(n.log_std_init), "network.log_std_init", "must be a finite number")
    need(e.max_episode_steps is None or e.max_episode_steps >= 1, "env.max_episode_steps",
         "must be >= 1 or null")
    need(bool(str(e.id).strip()) or bool(e.entry_point), "env.id", "must name a gymnasium environment")
    need(all(isinstance(w, (dict, DictConfig)) and "_target_" in w for w in e.wrappers), "env.wrappers",
         "must be a list of {_target_: module.WrapperClass, ...} entries")
    need(cfg.torch_threads >= 0, "torch_threads", "must be >= 0 (0 keeps torch's default)")
    need(cfg.log_interval >= 1, "log_interval", "must be >= 1")
    need(cfg.checkpoint_interval >= 0, "checkpoint_interval", "must be >= 0 (0: final checkpoint only)")
    need(cfg.eval.every_steps >= 0, "eval.every_steps", "must be >= 0 (0: no periodic evaluation)")
    need(cfg.eval.episodes >= 1, "eval.episodes", "must be >= 1")
    need(cfg.eval.train_window >= 1, "eval.train_window", "must be >= 1")
    need(cfg.eval.stop_at_return is None or cfg.eval.every_steps > 0, "eval.stop_at_return",
         "needs periodic evaluation (eval.every_steps > 0)")
    need(cfg.eval.objective != "best" or cfg.eval.every_steps > 0, "eval.objective",
         "'best' needs periodic evaluation (eval.every_steps > 0)")
    need(cfg.eval.objective != "final" or cfg.eval.final, "eval.objective",
         "'final' needs eval.final=true")
    if a.n_steps >= 1 and e.num_envs >= 1 and a.batch_size >= 1:
        rollout = a.n_steps * e.num_envs
        if a.batch_size > rollout:
            out.append(f"algo.batch_size={a.batch_size}: larger than the rollout "
                       f"(algo.n_steps x env.num_envs = {a.n_steps} x {e.num_envs} = {rollout})")
        elif rollout % a.batch_size:
            out.append(f"algo.batch_size={a.batch_size}: must divide the rollout "
                       f"(algo.n_steps x env.num_envs = {rollout}) so every sample is used once per epoch")
    return out


def validate(cfg: DictConfig) -> None:
    """Raise one UserError listing every range problem of a composed config."""
    problems = _problems(cfg)
    if problems:
        raise UserError("invalid config: " + "; ".join(problems))
