"""Structured configs (the schema Hydra validates types and key names against) and range checks.

Every key's default and meaning is stated once, here (`key(default, help)`); the presets in conf/ list only
what they change, and docs/configuration.md's key tables are generated from these dataclasses
(`python -m ppo_cli.config docs/configuration.md`; a test checks they are current).

Hydra rejects unknown keys and wrong types while composing, because every group is backed by one of the
dataclasses below. What a type cannot say (ranges, batch sizes that fit the rollout, env ids) is checked by
`validate`, which returns every problem as a sentence naming the key.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
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


class Recurrent(str, Enum):
    lstm = "lstm"
    gru = "gru"


class Precision(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


class MultiAgent(str, Enum):
    ippo = "ippo"
    mappo = "mappo"
    selfplay = "selfplay"


class Init(str, Enum):
    orthogonal = "orthogonal"
    xavier = "xavier"
    kaiming = "kaiming"


# `async` is a Python keyword, so the members are named through Enum's functional form: OmegaConf matches a
# config value to an enum member by its name, and the name users write (README, presets) is `async`.
# `async_`, the member's name before, stays an alias: configs stored in older checkpoints say `async_`.
Vectorization = Enum("Vectorization", {"auto": "auto", "sync": "sync", "async": "async", "async_": "async",
                                       "native": "native"}, type=str)


class Backend(str, Enum):
    gymnasium = "gymnasium"
    envpool = "envpool"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def key(default: Any, help: str) -> Any:
    """A config key: its default and its meaning, stated once (docs/configuration.md is generated from these)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class AlgoConfig:
    # The first 13 keys are the source table's, with its defaults.
    gamma: float = key(0.99, "discount factor, in (0, 1]")
    clip_range: float = key(0.1, "epsilon: the ratio is clipped to [1 - eps, 1 + eps]; > 0")
    gae_lambda: float = key(0.9, "GAE lambda, in [0, 1] (0: one-step TD, 1: Monte Carlo)")
    K_epochs: int = key(3, "passes over each rollout")
    n_steps: int = key(1024, "steps per env per rollout (a rollout is n_steps x env.num_envs samples)")
    batch_size: int = key(64, "minibatch size; must divide the rollout, so each sample is used once per epoch")
    lr_actor: float = key(3e-4, "Adam learning rate of the policy (actor encoder, policy head, and a shared trunk)")
    lr_critic: float = key(3e-4, "Adam learning rate of the value function (critic encoder and value head)")
    ent_coef: float = key(0.01, "entropy bonus coefficient (start value when scheduled)")
    vf_coef: float = key(0.5, "value loss coefficient")
    max_grad_norm: float = key(0.5, "global gradient norm clip")
    total_timesteps: int = key(1_000_000, "environment steps to train; the run stops after the update that "
                                          "reaches it")
    optimizer: OptimizerName = key(OptimizerName.adam, "adam / adamw")
    lr_schedule: Schedule = key(Schedule.constant, "constant / linear (both learning rates decay to 0 at "
                                                   "total_timesteps)")
    ent_schedule: Schedule = key(Schedule.constant, "constant / linear (ent_coef to ent_coef_final at "
                                                    "total_timesteps: explore early, converge late)")
    ent_coef_final: float = key(0.0, "end value of the linear entropy schedule")
    weight_decay: float = key(0.0, "weight decay (decoupled for adamw)")
    eps: float = key(1e-5, "Adam epsilon")
    normalize_advantage: bool = key(True, "normalize advantages per minibatch (mean 0, std 1)")
    target_kl: float | None = key(None, "stop the update early once a minibatch's approx_kl exceeds "
                                        "1.5 x target_kl")
    seq_len: int | None = key(None, "recurrent policies: the update replays sequences of this many steps, each "
                                    "from the state stored where it starts (truncated back-propagation through "
                                    "time, as sb3-contrib and CleanRL's LSTM scripts); must divide algo.n_steps and "
                                    "algo.batch_size; null replays each env's whole rollout (algo.n_steps)")
    clip_range_vf: float | None = key(None, "clip the value update around the old value (PPO2's pessimistic max "
                                            "form)")
    multi_agent: MultiAgent | None = key(None, "PettingZoo envs (docs/multi-agent.md): ippo (actor and critic read "
                                               "the agent's own observation) / mappo (the critic also reads the "
                                               "global state) / selfplay (two-player turn-based games, against its "
                                               "own past policies); null: one gymnasium agent")
    selfplay_pool: int = key(10, "algo=selfplay: past policies kept as opponents (one snapshot per update, the "
                                 "oldest dropped)")


# The encoders a config may name (network.type); policy/encoders.py builds each (ENCODERS, in this order).
ENCODER_NAMES = ("mlp", "cnn", "impala")
IMAGE_ENCODERS = ("cnn", "impala")  # the encoders that read images (and only images)
# What network.net_arch and network.shared_trunk are where left null: the source table's separate [64, 64] MLPs;
# the PPO paper's one Nature trunk of [512] for actor and critic; CleanRL's procgen IMPALA trunk of [256].
ENCODER_DEFAULTS: dict[str, tuple[list[int], bool]] = {"mlp": ([64, 64], False), "cnn": ([512], True),
                                                       "impala": ([256], True)}


@dataclass
class NetworkConfig:
    type: str = key("auto", "the encoder (network input -> features) of actor and critic, by its name in "
                            "encoders.ENCODERS: mlp, or for image observations cnn (Nature DQN) / impala "
                            "(docs/pixels.md); auto picks from the observation space as the run starts: cnn for "
                            "images of at least 36x36, impala for smaller images, mlp otherwise. For cnn and "
                            "impala, net_arch is the linear layers after the convolutions")
    net_arch: list[int] | None = key(None, "hidden layer widths, the same for actor and critic; null is the "
                                           "encoder's own: [64, 64] for mlp, [512] for cnn, [256] for impala")
    activation_fn: Activation = key(Activation.tanh, "tanh / relu / leaky_relu")
    init: Init = key(Init.orthogonal, "hidden layers: orthogonal (gain sqrt 2), xavier (suits tanh) or kaiming "
                                      "(suits ReLU); heads are always orthogonal with gain 0.01 (policy) and 1.0 "
                                      "(value)")
    bias: float = key(0.0, "initial value of every bias")
    shared_trunk: bool | None = key(None, "one encoder for actor and critic, its parameters trained at lr_actor; "
                                          "null is the encoder's own: false for mlp, true for cnn and impala")
    log_std_init: float = key(0.0, "Box actions: initial log standard deviation of the Gaussian (learned, "
                                   "state-independent; 0.0 is std 1)")
    recurrent: Recurrent | None = key(None, "a recurrent core between the encoder and the heads: lstm / gru / null "
                                            "(none); the update then replays whole env sequences "
                                            "(docs/recurrent.md)")
    rnn_hidden: int = key(128, "hidden size of the recurrent core")
    rnn_shared: bool = key(False, "the critic reads the actor's recurrent core instead of having its own (always "
                                  "so with network.shared_trunk=true)")
    precision: Precision = key(Precision.float32, "image encoders (cnn, impala): bfloat16 runs the encoder under "
                                                  "torch.autocast in bfloat16 (rollout, update, evaluation); "
                                                  "parameters, optimizer, heads and losses stay float32. On a "
                                                  "CPU with native bfloat16 (AVX512-BF16, AMX) a minibatch "
                                                  "step is 1.65x faster (docs/pixels.md). auto: bfloat16 where "
                                                  "the device computes it natively (those CPUs, GPUs from "
                                                  "Ampere on), else float32; the banner says which. Other "
                                                  "networks compute in float32 only")
    channels_last: bool | None = key(None, "image observations: true if they are (height, width, channels), false "
                                           "if (channels, height, width); null tells from the shape (last dim <= 4: "
                                           "channels last, else first dim <= 4: channels first)")
    agent_id: bool = key(False, "algo=ippo / mappo: actor and critic also read the one-hot of the agent's index, so "
                                "the shared parameters can act differently per agent")
    share: bool = key(True, "algo=ippo / mappo: one policy shared by all agents (true), or one per agent group "
                            "(false; agents adversary_0 and adversary_1 form the group adversary), which agents "
                            "whose observation spaces differ need (MPE's simple_tag); MLP policies without a "
                            "recurrent core")


@dataclass
class EnvConfig:
    id: str = key("CartPole-v1", "any registered gymnasium id, or `module:Id-v0` (the module is imported to "
                                 "register it)")
    num_envs: int = key(8, "parallel envs")
    vectorization: Vectorization = key(Vectorization.auto, "auto (native where the env has a native vector env "
                                                           "ppo-cli runs and nothing wraps each env, else sync) / "
                                                           "sync (one process) / async (a process per env; pays off "
                                                           "for slow envs) / native (the env's own numpy vector env: "
                                                           "CartPole; envs/native.py)")
    entry_point: str | None = key(None, "`module:ClassOrFactory` of an unregistered env; when set, it is built "
                                        "instead of env.id")
    kwargs: dict[str, Any] = key({}, "keyword arguments for the env (`env.kwargs.continuous=true` adds or sets "
                                     "one)")
    wrappers: list[Any] = key([], "wrappers applied to each env in order, as `{_target_: module.Wrapper, arg: "
                                  "value}`")
    image: bool | str = key("auto", "how a uint8 Box of rank 2 or 3 is read: true as an image (for cnn / impala), "
                                    "false as flat numbers (for an MLP: codes such as MiniGrid's 7x7x3 grid), auto "
                                    "as an image where its two largest sides are >= 16")
    obs_keys: list[str] | None = key(None, "Dict observations: the keys to keep, dropping the others before anything "
                                           "reads them (a Text `mission`, say); null keeps every key")
    step_timeout: float | None = key(None, "async envs: a sub-env whose reset() or step() takes longer than this "
                                           "many seconds stops the run in one line naming it, its workers "
                                           "stopped (null: wait for ever; in every run a note says when no step "
                                           "has returned for a minute)")
    check: bool = key(False, "run gymnasium's env checker on one instance before training; a failure stops the "
                             "run")
    max_episode_steps: int | None = key(None, "override the env's time limit; null keeps the registered one")
    normalize_obs: bool = key(False, "normalize observations by their running mean and variance (statistics saved "
                                     "in checkpoints; the continuous presets turn it on)")
    clip_obs: float = key(10.0, "normalized observations are clipped to [-clip_obs, clip_obs]")
    normalize_reward: bool = key(False, "divide training rewards by the running std of the discounted return")
    clip_reward: float = key(10.0, "scaled rewards are clipped to [-clip_reward, clip_reward]")
    atari: bool = key(False, "env.id is an Atari game (ALE/Pong-v5, ...): apply the standard Atari pipeline "
                             "(84x84 grayscale, frame skip 4, 4 stacked frames; for training also episodic life "
                             "and rewards clipped to their sign); returns are game scores (docs/pixels.md; needs "
                             "the atari extra)")
    backend: Backend = key(Backend.gymnasium, "gymnasium (gymnasium's vector envs, any env) / envpool (pip install "
                                              "'.[envpool]': envpool's C++ envs for the Atari, MuJoCo, Box2D "
                                              "and classic-control tasks it provides; docs/envpool.md)")


class Objective(str, Enum):
    final = "final"
    best = "best"
    train = "train"


@dataclass
class EvalConfig:
    every_steps: int = key(50_000, "env steps between periodic evaluations (eval/* curves, best.pt); 0 turns "
                                   "them off")
    episodes: int = key(10, "episodes per evaluation")
    deterministic: bool = key(True, "argmax actions (a Gaussian's mean); false samples from the policy")
    final: bool = key(True, "evaluate once more after training")
    stop_at_return: float | None = key(None, "stop training as soon as an evaluation's mean return reaches this")
    objective: Objective = key(Objective.final, "final / best / train: the run's objective in result.json (and "
                                                "for sweeps): the final evaluation, the best periodic one, or the "
                                                "mean return of the last eval.train_window training episodes")
    train_window: int = key(100, "training episodes averaged for eval.objective=train")
    max_episode_steps: int = key(108_000, "evaluation cuts an episode after this many steps, so an env without a "
                                          "time limit cannot hang it; cut episodes are counted and reported")


@dataclass
class DoctorConfig:
    enabled: bool = key(True, "after each update, check the statistics for the symptoms of a run going wrong and say "
                              "each once (console, TensorBoard text, result.json warnings; run/doctor.py)")
    entropy_collapse: float = key(0.1, "entropy_collapse: the policy's spread fell below this fraction of its first "
                                       "update's (a Gaussian's std; a categorical head's entropy) within doctor.early")
    early: float = key(0.1, "the first fraction of training in which an entropy collapse is premature")
    kl_max: float = key(0.05, "kl_high: approx_kl above this for doctor.patience updates; with algo.target_kl, "
                              "every one of doctor.patience updates stopped early by it")
    clip_fraction_max: float = key(0.3, "clip_fraction_high: above this for doctor.patience updates")
    patience: int = key(3, "updates in a row a fast symptom (KL, clip fraction) must last")
    patience_long: int = key(20, "updates in a row a slow symptom (explained variance, clipped gradients) must last; "
                                 "clipped gradients also for a tenth of the run")
    explained_variance_min: float = key(0.0, "value_not_learning: explained variance below this for "
                                             "doctor.patience_long updates")
    value_loss_factor: float = key(100.0, "value_loss_exploding: the value loss above this x its median over the "
                                          "first doctor.patience updates")
    reward_scale_max: float = key(100.0, "reward_scale: rewards above this a step in absolute value without "
                                         "env.normalize_reward")
    input_scale_max: float = key(10.0, "obs_scale: the network's flat inputs above this in mean absolute value "
                                       "without env.normalize_obs")
    flat_after: float = key(0.3, "returns_flat: from this fraction of training (and doctor.patience_long updates) "
                                 "on, the training return no better than in the first updates (by "
                                 "doctor.flat_tolerance, relative)")
    flat_tolerance: float = key(0.05, "returns_flat: the improvement that counts, relative to the first returns")
    eval_gap: float = key(0.5, "eval_below_train: 2 evaluations in a row below the training return by this "
                               "fraction of it")
    sps_drop: float = key(0.5, "sps_dropping: the recent steps per second below this fraction of the run's best")


@dataclass
class WandbConfig:
    project: str = key("ppo-cli", "the W&B project")
    entity: str | None = key(None, "the W&B entity (team or user); null: your default")
    group: str | None = key(None, "the W&B group; null: the sweep's folder name for a sweep's jobs, else none")
    tags: list[str] = key([], "W&B tags, beside env:<id> and git:<commit>")
    mode: str | None = key(None, "online / offline / disabled; null: WANDB_MODE, else online (offline writes under "
                                 "the run folder, `wandb sync` uploads it later)")


@dataclass
class MlflowConfig:
    tracking_uri: str = key("sqlite:///mlflow.db", "where MLflow keeps runs: a local SQLite file by default "
                                                   "(relative to where ppo-train runs), or a server's URL")
    experiment: str = key("ppo-cli", "the MLflow experiment")


@dataclass
class LoggerConfig:
    backends: list[str] = key(["tensorboard"], "where scalars go: tensorboard (always written: the run folder's own "
                                               "record), wandb, mlflow (docs/trackers.md; each an extra)")
    strict: bool = key(False, "a tracker that is not installed or cannot be reached stops the run instead of a "
                              "warning line")
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class TuneConfig:
    seeds: int = key(1, "with hydra/sweeper=ppo_tune: each configuration is trained on this many seeds (seed, "
                        "seed + 1, ...) and scored by their mean; pruning compares the mean of the seeds' evaluations")
    storage: str | None = key(None, "set by the ppo_tune sweeper for its jobs: the study's storage (an RDB URL or "
                                    "journal:PATH), to which each periodic evaluation is reported; a resume clears "
                                    "it")
    study: str | None = key(None, "set by ppo_tune: the study's name in tune.storage")
    trial: int | None = key(None, "set by ppo_tune: this job's trial number in the study")


@dataclass
class TrainConfig:
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    doctor: DoctorConfig = field(default_factory=DoctorConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    seed: int = key(1, "seeds torch (initialization), the action sampling and minibatch shuffling generators, "
                       "and the envs (env i gets seed + i)")
    device: Device = key(Device.auto, "auto / cpu / cuda; auto picks the faster for the policy: the GPU for CNNs "
                                      "and large MLPs, the CPU for small MLPs (ppo_cli/devices.py)")
    torch_threads: int | None = key(None, "torch intra-op threads, and numpy's BLAS threads; null (auto): 1 for "
                                          "MLPs (small MLPs are fastest on one), torch's default (a thread per "
                                          "core) for image encoders, shared among the processes of a torchrun "
                                          "on the machine; 0 keeps the libraries' defaults")
    fast_rollout: bool = key(True, "act in numpy during rollouts where the numpy path covers the policy (CPU, "
                                   "float32, ppo-cli's MLP actor-critic: every head, observation normalization, "
                                   "shared or separate trunks); false acts through torch. Both take the same "
                                   "actions from the same seed (docs/speed.md)")
    fast_update: bool = key(True, "compute the loss and its gradients in numpy where the numpy path covers the "
                                  "policy (as for fast_rollout); false uses torch autograd. Both compute the same "
                                  "update; a policy it does not cover trains with autograd and the run says why")
    torch_compile: bool = key(False, "pass the autograd loss and the torch rollout's policy step through "
                                     "torch.compile; they only run where the numpy paths do not (fast_update / "
                                     "fast_rollout=false, CNNs, device=cuda): about 35% off an autograd minibatch "
                                     "step at [64, 64], 5% at [256, 256], for 5-20 s of compiling; needs a C++ "
                                     "compiler on the CPU, and where compiling fails the run says so in one line "
                                     "and goes on uncompiled. Where the numpy update runs the loss is not "
                                     "compiled and the run says so")
    log_interval: int = key(1, "updates between plain console lines (TensorBoard always gets every update)")
    checkpoint_interval: int = key(10, "updates between periodic checkpoints; 0 writes only the final one")
    resume: str | None = key(None, "a checkpoint.pt to continue from (docs/evaluation-and-resume.md)")
    trust_env_code: bool = key(False, "with resume: let the checkpoint's config run code: env recipe imports and "
                                      "calls beyond ppo-cli's allowlist (env.entry_point, a module:Id id, wrapper "
                                      "targets, nested targets), and interpolations; without it such a checkpoint "
                                      "is refused and nothing runs")


# docs/configuration.md's key tables: one per group, in this order, with the line that introduces each.
TABLE_INTROS = {
    "": "Top level:",
    "eval": "`eval` (evaluation on separate envs, seeds seed + 10000, ...; never the training envs):",
    "doctor": "`doctor` (the training doctor's thresholds, [TensorBoard](tensorboard.md#the-training-doctor)):",
    "tune": "`tune` (tuning sweeps, [Sweeps](sweeps.md): the ppo_tune sweeper reads `tune.seeds` and sets the rest "
            "for its jobs):",
    "logger": "`logger` (experiment trackers beside TensorBoard, [Trackers](trackers.md)):",
    "logger.wandb": "`logger.wandb` (Weights & Biases, `pip install \".[wandb]\"`):",
    "logger.mlflow": "`logger.mlflow` (MLflow, `pip install \".[mlflow]\"`):",
    "algo": "`algo` (`algo=ppo` is these defaults; the first 13 rows are the source table's):",
    "network": "`network` (`network=auto` is these defaults; `network=mlp`, `network=cnn` and `network=impala` name "
               "the encoder, the last two for images, docs/pixels.md; `network=mlp_large` has [256, 256]):",
    "env": "`env` (`env=<name>` presets: CartPole-v1, Acrobot-v1, MountainCar-v0, LunarLander-v3, Pendulum-v1, "
           "MountainCarContinuous-v0, LunarLanderContinuous-v3, BipedalWalker-v3, HalfCheetah-v5, Hopper-v5, "
           "Walker2d-v5, Ant-v5, Humanoid-v5; MaskedGrid-v0 and GoalReach-v0, the examples of action masks and "
           "Dict observations; PointMaze_UMaze-v3, a Dict task from gymnasium-robotics; the Atari games Pong, "
           "Breakout, BeamRider, SpaceInvaders, Seaquest, Qbert, Enduro, docs/pixels.md):",
}


def _shown(value: Any) -> str:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, float) and value and abs(value) < 1e-3:
        return f"{value:.0e}".replace("e-0", "e-")
    return str(value)


def key_tables() -> str:
    """The Markdown key tables of docs/configuration.md, from the dataclasses' defaults and help."""
    groups = {"": TrainConfig, "eval": EvalConfig, "algo": AlgoConfig, "network": NetworkConfig, "env": EnvConfig,
              "doctor": DoctorConfig, "tune": TuneConfig, "logger": LoggerConfig, "logger.wandb": WandbConfig,
              "logger.mlflow": MlflowConfig}
    parts = []
    for name, cls in groups.items():
        rows = [TABLE_INTROS[name], "", "| key | default | meaning |", "|---|---|---|"]
        for f in fields(cls):
            if "help" not in f.metadata:
                continue
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            full = f"{name}.{f.name}" if name else f.name
            rows.append(f"| `{full}` | {_shown(default)} | {f.metadata['help']} |")
        parts.append("\n".join(rows))
    return "\n\n".join(parts) + "\n"


def choice(value: Any) -> str:
    """The plain string of an enum-typed config value (str() of a str-Enum gives 'Class.member')."""
    return value.value if isinstance(value, Enum) else str(value)


def env_label(env_cfg: DictConfig) -> str:
    """How the env is named to the user: an entry_point env by its entry point, not the default id beside it."""
    return env_cfg.get("entry_point") or env_cfg.id


def stored_config(text: Any, what: str = "checkpoint") -> dict[str, Any]:
    """A run config stored in a file, as plain data exactly as written: nothing resolved, nothing built (recipe.py
    decides what of it may run)."""
    try:
        node = OmegaConf.create(text) if isinstance(text, str) else None
    except Exception as exc:  # noqa: BLE001 - any YAML or OmegaConf parse error means the same thing here
        raise UserError(f"the {what}'s config is not readable YAML ({str(exc).strip().splitlines()[0]})") from None
    if not isinstance(node, DictConfig):
        raise UserError(f"the {what}'s config is not a mapping of keys (read a {type(text).__name__})")
    return OmegaConf.to_container(node, resolve=False)  # type: ignore[return-value]


def config_from_yaml(text: str) -> DictConfig:
    """A run config stored in a checkpoint, typed by the schema (keys it lacks take today's defaults) and resolved
    (only after recipe.check let its interpolations through)."""
    try:
        stored = OmegaConf.create(text)
        # Written before env.image: every uint8 Box of rank 3 was an image, however small; an image encoder read it.
        if OmegaConf.select(stored, "env.image") is None and OmegaConf.select(stored, "network.type") in IMAGE_ENCODERS:
            OmegaConf.update(stored, "env.image", True, force_add=True)
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), stored)
    except Exception as exc:  # noqa: BLE001 - any OmegaConf validation error means the same thing here
        raise UserError(f"the checkpoint's config does not fit this ppo-cli version "
                        f"({str(exc).strip().splitlines()[0]})") from None
    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:  # noqa: BLE001 - a resolver may fail in any way
        raise UserError(f"the checkpoint's config cannot be resolved ({str(exc).strip().splitlines()[0]})") from None
    return cfg  # type: ignore[return-value]


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
    need(n.type in ("auto", *ENCODER_NAMES), "network.type", f"must be auto or name an encoder: "
                                                             f"{', '.join(ENCODER_NAMES)}")
    need(choice(n.precision) != "bfloat16" or n.type in ("auto", *IMAGE_ENCODERS), "network.precision",
         f"bfloat16 applies to the image encoders ({', '.join(IMAGE_ENCODERS)}); network.type={n.type} computes "
         f"in float32 only")
    need(n.net_arch is None or (len(n.net_arch) >= 1 and all(w >= 1 for w in n.net_arch)), "network.net_arch",
         "must list at least one layer width, each >= 1 (or be null: the encoder's own)")
    need(e.image in (True, False, "auto"), "env.image", "must be true, false or auto")
    need(e.step_timeout is None or e.step_timeout > 0, "env.step_timeout", "must be > 0 or null")
    need(all(b in ("tensorboard", "wandb", "mlflow") for b in cfg.logger.backends), "logger.backends",
         "must list tensorboard, wandb or mlflow")
    need(cfg.logger.wandb.mode in (None, "online", "offline", "disabled"), "logger.wandb.mode",
         "must be online, offline, disabled or null")
    need(e.step_timeout is None or (e.vectorization == "async" and e.backend == "gymnasium"), "env.step_timeout",
         "applies to async envs (env.vectorization=async): a sync env steps in this process, where a call cannot "
         "be cut short")
    need(e.num_envs >= 1, "env.num_envs", "must be >= 1")
    need(e.clip_obs > 0, "env.clip_obs", "must be > 0")
    need(e.clip_reward > 0, "env.clip_reward", "must be > 0")
    need(math.isfinite(n.log_std_init), "network.log_std_init", "must be a finite number")
    need(e.max_episode_steps is None or e.max_episode_steps >= 1, "env.max_episode_steps",
         "must be >= 1 or null")
    need(bool(str(e.id).strip()) or bool(e.entry_point), "env.id", "must name a gymnasium environment")
    need(all(isinstance(w, (dict, DictConfig)) and "_target_" in w for w in e.wrappers), "env.wrappers",
         "must be a list of {_target_: module.WrapperClass, ...} entries")
    need(0 <= cfg.seed <= 2**32 - 1, "seed", "must be in [0, 2**32 - 1]")
    need(cfg.torch_threads is None or cfg.torch_threads >= 0, "torch_threads",
         "must be >= 0 (0 keeps torch's default) or null (auto)")
    need(cfg.log_interval >= 1, "log_interval", "must be >= 1")
    need(cfg.checkpoint_interval >= 0, "checkpoint_interval", "must be >= 0 (0: final checkpoint only)")
    need(cfg.eval.every_steps >= 0, "eval.every_steps", "must be >= 0 (0: no periodic evaluation)")
    need(cfg.tune.seeds >= 1, "tune.seeds", "must be >= 1")
    need(cfg.eval.episodes >= 1, "eval.episodes", "must be >= 1")
    need(cfg.eval.max_episode_steps >= 1, "eval.max_episode_steps", "must be >= 1")
    need(cfg.eval.train_window >= 1, "eval.train_window", "must be >= 1")
    need(cfg.eval.stop_at_return is None or cfg.eval.every_steps > 0, "eval.stop_at_return",
         "needs periodic evaluation (eval.every_steps > 0)")
    need(cfg.eval.objective != "best" or cfg.eval.every_steps > 0, "eval.objective",
         "'best' needs periodic evaluation (eval.every_steps > 0)")
    need(cfg.eval.objective != "final" or cfg.eval.final, "eval.objective",
         "'final' needs eval.final=true")
    need(n.rnn_hidden >= 1, "network.rnn_hidden", "must be >= 1")
    if a.seq_len is not None and n.recurrent is None:
        out.append(f"algo.seq_len={a.seq_len}: sets the sequences a recurrent policy replays; this network has no "
                   f"recurrent core (network.recurrent=lstm or gru), so leave it null")
    elif a.seq_len is not None and a.seq_len < 1:
        out.append(f"algo.seq_len={a.seq_len}: must be >= 1 or null")
    elif a.seq_len is not None and a.n_steps >= 1 and a.n_steps % a.seq_len:
        out.append(f"algo.seq_len={a.seq_len}: must divide algo.n_steps={a.n_steps}, so the rollout is whole "
                   f"sequences")
    elif n.recurrent is not None and a.n_steps >= 1 and a.batch_size >= 1:
        seq = a.seq_len or a.n_steps
        if a.batch_size % seq:
            what = f"algo.seq_len={seq}" if a.seq_len else f"algo.n_steps={seq} (algo.seq_len=null)"
            out.append(f"algo.batch_size={a.batch_size}: with network.recurrent={choice(n.recurrent)} a minibatch is "
                       f"whole sequences of {what} steps, so algo.batch_size must be a multiple of it (or set "
                       f"algo.seq_len to a divisor of both: truncated back-propagation through time)")
    need(a.selfplay_pool >= 1, "algo.selfplay_pool", "must be >= 1")
    need(not n.agent_id or a.multi_agent in ("ippo", "mappo"), "network.agent_id",
         "applies to algo=ippo / mappo (the agents of a PettingZoo parallel env)")
    need(n.share or a.multi_agent in ("ippo", "mappo"), "network.share",
         "a policy per agent group is for the agents of a PettingZoo parallel env: use algo=ippo or "
         "algo=mappo")
    need(n.share or n.recurrent is None, "network.share",
         "a policy per agent group is built for policies without a recurrent core: set "
         "network.recurrent=null")
    if a.multi_agent == "selfplay" and n.recurrent is not None:
        out.append("network.recurrent: algo=selfplay's opponents play the learner's past policies move by move, "
                   "without a recurrent state; use network.recurrent=null")
    if a.multi_agent == "mappo" and n.recurrent is not None and n.rnn_shared:
        out.append("network.rnn_shared=true: algo=mappo's critic reads the global state through its own encoder and "
                   "core; set network.rnn_shared=false")
    if a.multi_agent == "mappo" and n.shared_trunk:
        out.append("network.shared_trunk=true: algo=mappo's critic reads the global state, which the actor must not "
                   "see, so the two need encoders of their own (network.shared_trunk=false)")
    # A PettingZoo env's rollout has a row per agent, known once the env is built (algo/ppo.py checks it there).
    if a.n_steps >= 1 and e.num_envs >= 1 and a.batch_size >= 1 and a.multi_agent not in ("ippo", "mappo"):
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


DOCS_BEGIN, DOCS_END = "<!-- config-keys:begin -->", "<!-- config-keys:end -->"


def write_key_tables(path: str) -> None:
    """Replace the block between the markers in `path` with key_tables()."""
    text = open(path, encoding="utf-8").read()
    head, _, rest = text.partition(DOCS_BEGIN)
    _, _, tail = rest.partition(DOCS_END)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{DOCS_BEGIN}\n{key_tables()}{DOCS_END}{tail}")


if __name__ == "__main__":
    import sys

    write_key_tables(sys.argv[1] if len(sys.argv) > 1 else "docs/configuration.md")
