"""What the benchmark scripts share: ppo-cli's composed config, a ppo-cli run from overrides (in this process,
quietly), and Stable-Baselines3's PPO set up from ppo-cli's Atari config (atari.py, returns.py --peer sb3)."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import DictConfig, OmegaConf  # noqa: E402


def child_env(**overrides: str) -> dict[str, str]:
    """The environment for a benchmark's worker process: this checkout first on PYTHONPATH, and whatever was on it
    kept (a device machine's carried wheels live there)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **overrides}


def compose(overrides: list[str]) -> DictConfig:
    """ppo-cli's config for these overrides, as `ppo-train` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from ppo_cli.config import register_configs

    register_configs()
    with initialize_config_module("ppo_cli.conf", version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def run_ppo_cli(overrides: list[str]) -> Any:
    """Train with these overrides (plus no periodic checkpoints, CPU, one thread) and return the TrainResult."""
    from ppo_cli.run.runner import Runner

    cfg = compose(["checkpoint_interval=0", "device=cpu", "torch_threads=1", *overrides])
    with tempfile.TemporaryDirectory() as d:
        trainer = Runner(cfg, Path(d), rich_progress=False)
        with contextlib.redirect_stdout(io.StringIO()):
            result = trainer.run()
        trainer.close()
    return result


def atari_overrides(game: str) -> list[str]:
    """ppo-cli's Atari setting for a preset in conf/env/ (Breakout, Pong, ...): the Nature CNN, the PPO paper's
    hyperparameters."""
    return [f"env={game}", "network=cnn", "algo=ppo_atari"]


def _sb3_gaps(cfg: DictConfig) -> list[str]:
    """The settings of `cfg` that SB3's PPO with CnnPolicy has no equal for (empty when it can run the same)."""
    from ppo_cli.config import choice
    from ppo_cli.policy.actor_critic import settle_network

    settle_network(cfg)  # network=auto decided as the run will decide it
    a, n, e = cfg.algo, cfg.network, cfg.env
    want = {"env.atari": (e.atari, True), "network.type": (n.type, "cnn"),
            "network.net_arch": (list(n.net_arch), [512]), "network.shared_trunk": (n.shared_trunk, True),
            "network.init": (choice(n.init), "orthogonal"), "network.bias": (n.bias, 0.0),
            "network.recurrent": (n.recurrent, None),
            "env.normalize_obs": (e.normalize_obs, False), "env.normalize_reward": (e.normalize_reward, False),
            "algo.lr_critic": (a.lr_critic, a.lr_actor), "algo.optimizer": (choice(a.optimizer), "adam"),
            "algo.weight_decay": (a.weight_decay, 0.0), "algo.ent_schedule": (choice(a.ent_schedule), "constant"),
            # SB3 stops an epoch at 1.5 x target_kl and clips the value differently: only their absence matches.
            "algo.target_kl": (a.target_kl, None), "algo.clip_range_vf": (a.clip_range_vf, None)}
    gaps = [f"{k}={have}" for k, (have, need) in want.items() if have != need]
    if choice(a.lr_schedule) not in ("constant", "linear"):
        gaps.append(f"algo.lr_schedule={choice(a.lr_schedule)}")
    return gaps


def sb3_atari_ppo(cfg: DictConfig, device: str = "cpu", tensorboard_log: str | None = None) -> Any:
    """Stable-Baselines3's PPO (CnnPolicy) on cfg's Atari game with cfg's hyperparameters, so both tools train
    on one description of the setting:

    - envs: `make_atari_env` (SB3's AtariWrapper: up to 30 no-ops, frame skip 4 with max-pooling, 84x84
      grayscale, episodic life, FIRE on reset, rewards clipped to their sign) + `VecFrameStack` of 4, on the
      ALE env with ppo-cli's keyword arguments (frameskip 1, sticky actions 0.25, minimal action set);
      cfg.env.num_envs of them, env i seeded cfg.seed + i as ppo-cli seeds its own;
    - PPO: n_steps, batch_size, epochs, gamma, lambda, clip, entropy and value coefficients, gradient clip,
      Adam epsilon and advantage normalization from cfg.algo; the learning rate constant or linear to 0 as
      cfg.algo.lr_schedule says (SB3's progress is read after each rollout, ppo-cli's before it: one rollout
      apart); seed cfg.seed; its training-episode statistics over the last eval.train_window games, as ppo-cli's.

    A setting SB3 has no equal for ends the script with one line naming it."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack

    from ppo_cli.config import choice, env_label
    from ppo_cli.envs import atari

    gaps = _sb3_gaps(cfg)
    if gaps:
        raise SystemExit(f"SB3's PPO has no equal for {', '.join(gaps)}: drop these overrides for an SB3 comparison")
    atari.register()
    a = cfg.algo
    ale_kwargs = atari.env_kwargs(OmegaConf.to_container(cfg.env.kwargs, resolve=True), env_label(cfg.env))
    envs = make_atari_env(cfg.env.id, n_envs=cfg.env.num_envs, seed=cfg.seed, env_kwargs=ale_kwargs,
                          wrapper_kwargs={"noop_max": atari.NOOP_MAX, "frame_skip": atari.FRAME_SKIP,
                                          "screen_size": atari.SCREEN_SIZE})
    envs = VecFrameStack(envs, atari.FRAME_STACK)
    lr = float(a.lr_actor)
    learning_rate = (lambda remaining: remaining * lr) if choice(a.lr_schedule) == "linear" else lr
    return PPO("CnnPolicy", envs, learning_rate=learning_rate, n_steps=a.n_steps, batch_size=a.batch_size,
               n_epochs=a.K_epochs, gamma=a.gamma, gae_lambda=a.gae_lambda, clip_range=a.clip_range,
               normalize_advantage=a.normalize_advantage, ent_coef=a.ent_coef, vf_coef=a.vf_coef,
               max_grad_norm=a.max_grad_norm, policy_kwargs={"optimizer_kwargs": {"eps": a.eps}}, device=device,
               seed=cfg.seed, stats_window_size=cfg.eval.train_window, tensorboard_log=tensorboard_log, verbose=0)
