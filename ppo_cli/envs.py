"""The env factory: from the env config to a seeded gymnasium vector env, plus the checks on its spaces.

Autoreset: the vector envs run in SAME_STEP mode. A step that ends an episode returns the next episode's
first observation at once and puts the real final observation in `info["final_obs"]`. So every stored
transition is a real one (NEXT_STEP mode would hand back one dummy transition per episode that must be
masked out of training), and a truncated episode can be bootstrapped from V(final_obs) in the same step.
"""

from __future__ import annotations

import difflib
import importlib
from collections import deque
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers.vector import RecordEpisodeStatistics
from omegaconf import DictConfig, OmegaConf

from ppo_cli.errors import UserError

SUPPORTED_ACTIONS = (gym.spaces.Discrete,)
SUPPORTED_OBS = (gym.spaces.Box, gym.spaces.Discrete)


def resolve_env_id(env_id: str) -> gym.envs.registration.EnvSpec:
    """Find the registered spec for `env_id` ("Id-v0" or gymnasium's "module:Id-v0"), or explain why not."""
    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UserError(
                f"env.id={env_id!r}: cannot import module {module!r} ({exc}); make it importable "
                f"(pip install it, or add its folder to PYTHONPATH)"
            ) from None
    try:
        return gym.spec(name)
    except gym.error.Error:
        close = difflib.get_close_matches(name, list(gym.registry.keys()), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"env.id={env_id!r}: not a registered gymnasium environment{hint}") from None


def _env_fn(env_cfg: DictConfig, render_mode: str | None = None,
            wrappers: Sequence[Callable[[gym.Env], gym.Env]] = ()) -> Callable[[], gym.Env]:
    spec = resolve_env_id(env_cfg.id)
    kwargs: dict[str, Any] = OmegaConf.to_container(env_cfg.kwargs, resolve=True)  # type: ignore[assignment]
    if env_cfg.max_episode_steps is not None:
        kwargs["max_episode_steps"] = env_cfg.max_episode_steps
    if render_mode is not None:
        kwargs["render_mode"] = render_mode

    def make() -> gym.Env:
        env = gym.make(spec, **kwargs)
        for wrap in wrappers:
            env = wrap(env)
        return env

    return make


def make_vec_env(env_cfg: DictConfig, seed: int, num_envs: int | None = None, render_mode: str | None = None,
                 wrappers: Sequence[Callable[[gym.Env], gym.Env]] = ()) -> gym.vector.VectorEnv:
    """Build the vector env described by `env_cfg`, reset with seeds seed, seed+1, ... per sub-env."""
    n = env_cfg.num_envs if num_envs is None else num_envs
    fn = _env_fn(env_cfg, render_mode, wrappers)
    try:
        probe = _env_fn(env_cfg)()
    except gym.error.DependencyNotInstalled as exc:
        raise UserError(f"env.id={env_cfg.id!r}: a dependency is missing: {exc}") from None
    except TypeError as exc:
        raise UserError(f"env.id={env_cfg.id!r}: the env rejected its arguments (env.kwargs): {exc}") from None
    check_spaces(probe.observation_space, probe.action_space, env_cfg.id)
    probe.close()
    vec_cls = gym.vector.AsyncVectorEnv if env_cfg.vectorization == "async" else gym.vector.SyncVectorEnv
    envs = vec_cls([fn] * n, autoreset_mode=AutoresetMode.SAME_STEP)
    envs = RecordEpisodeStatistics(envs)
    envs.reset(seed=seed)
    return envs


def check_spaces(obs_space: gym.Space, act_space: gym.Space, env_id: str) -> None:
    if not isinstance(act_space, SUPPORTED_ACTIONS):
        raise UserError(f"env.id={env_id!r}: action space {act_space} is not supported "
                        f"(supported: {', '.join(c.__name__ for c in SUPPORTED_ACTIONS)})")
    if not isinstance(obs_space, SUPPORTED_OBS):
        raise UserError(f"env.id={env_id!r}: observation space {obs_space} is not supported "
                        f"(supported: {', '.join(c.__name__ for c in SUPPORTED_OBS)})")


def describe_space(space: gym.Space) -> dict[str, Any]:
    """A plain-data description of a space, stored in checkpoints to rebuild the policy without the env."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n)}
    if isinstance(space, gym.spaces.Box):
        return {"type": "Box", "shape": list(space.shape)}
    return {"type": type(space).__name__}


# --- Saving and restoring the envs' own state, so that a resumed run continues the same episodes. ---
# Only plain values are kept (numbers, arrays, RNG states), so a checkpoint stays loadable with
# weights_only=True. An env that holds anything else (a physics engine, a window) cannot be restored this
# way; such runs resume from freshly reset envs and say so.

_PLAIN = (bool, int, float, str, type(None))
# Settings rather than state, rebuilt from the config: spaces, specs, modes; deques hold logging history only.
_SKIP_TYPES = (gym.Space, gym.envs.registration.EnvSpec, Enum, deque)
_SKIP_KEYS = {"env", "metadata", "spec", "_np_random", "_cached_spec"}


def _plain(value: Any) -> Any:
    """Value as checkpoint-safe data, or raise TypeError."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return {"__ndarray__": torch.from_numpy(value.copy())}
    if isinstance(value, (tuple, list)):
        return {"__seq__": [_plain(v) for v in value], "tuple": isinstance(value, tuple)}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _plain(v) for k, v in value.items()}}
    raise TypeError(type(value).__name__)


def _unplain(value: Any) -> Any:
    if isinstance(value, dict) and "__ndarray__" in value:
        return value["__ndarray__"].numpy().copy()
    if isinstance(value, dict) and "__seq__" in value:
        items = [_unplain(v) for v in value["__seq__"]]
        return tuple(items) if value["tuple"] else items
    if isinstance(value, dict) and "__dict__" in value:
        return {k: _unplain(v) for k, v in value["__dict__"].items()}
    return value


def _layers(env: gym.Env) -> list[Any]:
    chain = [env]
    while hasattr(chain[-1], "env"):
        chain.append(chain[-1].env)
    return chain


def _snapshot_obj(obj: Any) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for key, value in vars(obj).items():
        if key in _SKIP_KEYS or isinstance(value, _SKIP_TYPES) or callable(value):
            continue
        try:
            state[key] = _plain(value)
        except TypeError:
            raise TypeError(f"{type(obj).__name__}.{key} ({type(value).__name__})") from None
    rng = vars(obj).get("_np_random")
    if rng is not None:
        state["_np_random"] = rng.bit_generator.state
    return state


def snapshot(envs: gym.vector.VectorEnv) -> tuple[list[Any] | None, str | None]:
    """(state, None) for envs whose full state is plain data, else (None, reason)."""
    if not isinstance(envs.unwrapped, gym.vector.SyncVectorEnv):
        return None, "only sync vector envs can be saved"
    try:
        stats = _snapshot_obj(envs)  # RecordEpisodeStatistics: returns so far of the running episodes
        per_env = [[_snapshot_obj(layer) for layer in _layers(e)] for e in envs.unwrapped.envs]
    except TypeError as exc:
        return None, f"the env holds state that cannot be saved: {exc}"
    return [stats, per_env], None


def restore(envs: gym.vector.VectorEnv, state: list[Any]) -> None:
    stats, per_env = state
    pairs = [(envs, stats)]
    for env, layers in zip(envs.unwrapped.envs, per_env, strict=True):
        pairs += list(zip(_layers(env), layers, strict=True))
    for obj, saved in pairs:
        for key, value in saved.items():
            if key == "_np_random":
                obj._np_random.bit_generator.state = value
            else:
                setattr(obj, key, _unplain(value))
