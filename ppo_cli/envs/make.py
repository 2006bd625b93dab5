"""The env factory: from the env config to a seeded gymnasium vector env, plus the checks on its spaces.

Autoreset: the vector envs run in SAME_STEP mode. A step that ends an episode returns the next episode's
first observation at once and puts the real final observation in `info["final_obs"]`. So every stored
transition is a real one (NEXT_STEP mode would hand back one dummy transition per episode that must be
masked out of training), and a truncated episode can be bootstrapped from V(final_obs) in the same step.
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from enum import Enum
from functools import partial
from types import ModuleType
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.envs.registration import EnvSpec
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers import FilterObservation
from gymnasium.wrappers.vector import RecordEpisodeStatistics
from omegaconf import DictConfig, OmegaConf

from ppo_cli.config import env_label
from ppo_cli.envs import atari, envpool_backend
from ppo_cli.envs.agents import ParallelVectorEnv, env_kind, is_multi_agent, parallel_factory
from ppo_cli.envs.faults import EnvFaults, ReportCalls
from ppo_cli.envs.native import PER_ENV_KEYS, make_native, runs_native
from ppo_cli.envs.selfplay import OpponentPool, TwoPlayerEnv
from ppo_cli.envs.spaces import check_spaces
from ppo_cli.envs.step_cap import StepCap
from ppo_cli.errors import UserError, extra_hint


def _import(module: str, key: str, value: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - user code may fail to import in any way
        raise UserError(f"{key}={value!r}: cannot import module {module!r} ({type(exc).__name__}: {exc}); make it "
                        f"importable (pip install it, or add its folder to PYTHONPATH)") from None


def resolve_env_id(env_id: str) -> EnvSpec:
    """Find the registered spec for `env_id` ("Id-v0" or gymnasium's "module:Id-v0"), or explain why not.

    gymnasium.spec() alone does not import the module of a "module:Id" id, so it is imported here first.
    """
    module, _, name = env_id.rpartition(":")
    if module:
        _import(module, "env.id", env_id)
    if name.startswith("ALE/"):  # ale-py registers the ALE namespace when imported
        atari.register()
    try:
        return gym.spec(name)
    except gym.error.Error:
        close = difflib.get_close_matches(name, list(gym.registry.keys()), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"env.id={env_id!r}: not a registered gymnasium environment{hint}") from None


def env_spec(env_cfg: DictConfig) -> EnvSpec:
    """The spec to build: a registered id, or `env.entry_point` ("module:ClassOrFactory") for an unregistered env."""
    entry_point = env_cfg.get("entry_point")
    if not entry_point:
        return resolve_env_id(env_cfg.id)
    module, _, attr = entry_point.rpartition(":")
    if not module or not attr:
        raise UserError(f"env.entry_point={entry_point!r}: write it as 'module.path:ClassOrFunction'")
    _import(module, "env.entry_point", entry_point)
    if not hasattr(importlib.import_module(module), attr):
        raise UserError(f"env.entry_point={entry_point!r}: module {module!r} has no attribute {attr!r}")
    return EnvSpec(id=attr, entry_point=entry_point)


def _user_wrappers(env_cfg: DictConfig) -> list[Any]:
    wrappers = env_cfg.get("wrappers")
    return [] if wrappers is None else list(OmegaConf.to_container(wrappers, resolve=True))  # type: ignore[arg-type]


def apply_wrappers(env: Any, user_wrappers: list[Any]) -> Any:
    """env.wrappers around one env, in order (gymnasium wrappers; for a PettingZoo env, PettingZoo ones such as
    SuperSuit's)."""
    if user_wrappers:
        from hydra.utils import instantiate  # only runs with env.wrappers need Hydra's instantiate
    for i, wrapper_cfg in enumerate(user_wrappers):
        try:
            env = instantiate(wrapper_cfg, env=env)
        except Exception as exc:  # noqa: BLE001 - Hydra wraps any failure of the target
            raise UserError(f"env.wrappers[{i}]={wrapper_cfg}: cannot apply it "
                            f"({str(exc).strip().splitlines()[0]})") from None
    return env


def _env_fn(env_cfg: DictConfig, render_mode: str | None = None,
            wrappers: Sequence[Callable[[gym.Env], gym.Env]] = (), training: bool = False) -> Callable[[], gym.Env]:
    """A factory of one env: the base env, the Atari pipeline where env.atari is on (atari.py; `training` adds
    its training-only wrappers), then env.wrappers in order, the keys env.obs_keys keeps, then `wrappers` (ours:
    the step cap, video)."""
    is_atari = bool(env_cfg.get("atari"))
    if is_atari:
        atari.register()
    spec = env_spec(env_cfg)
    kwargs: dict[str, Any] = OmegaConf.to_container(env_cfg.kwargs, resolve=True)  # type: ignore[assignment]
    if is_atari:
        atari.check_spec(spec, env_label(env_cfg))
        kwargs = atari.env_kwargs(kwargs, env_label(env_cfg))
    if env_cfg.max_episode_steps is not None:
        kwargs["max_episode_steps"] = env_cfg.max_episode_steps
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    user_wrappers = _user_wrappers(env_cfg)
    keys = None if env_cfg.get("obs_keys") is None else list(env_cfg.obs_keys)

    def make() -> gym.Env:
        env = gym.make(spec, **kwargs)
        if is_atari:
            env = atari.wrap(env, training)
        env = apply_wrappers(env, user_wrappers)
        if keys is not None:
            space = env.observation_space
            if not isinstance(space, gym.spaces.Dict):
                raise UserError(f"env.obs_keys={keys}: selects keys of a Dict observation; this env's observation "
                                f"space is {space}")
            missing = [k for k in keys if k not in space.spaces]
            if missing:
                raise UserError(f"env.obs_keys={keys}: the observation has no key {', '.join(map(repr, missing))} "
                                f"(it has {', '.join(map(repr, space.spaces))})")
            env = FilterObservation(env, keys)
        for wrap in wrappers:
            env = wrap(env)
        return env

    return make


def env_spaces(env_cfg: DictConfig) -> tuple[gym.Space, gym.Space]:
    """The observation and action spaces of one env as a run sees them, checked (spaces.check_spaces): one env is
    built and closed (envpool: a pool of one)."""
    label = env_label(env_cfg)
    if is_multi_agent(env_cfg):  # one copy of a PettingZoo env: its rows' spaces (agents.py, selfplay.py)
        probe_ma = _multi_agent(env_cfg, 1, OpponentPool(1))
        probe_ma.close()
        return probe_ma.single_observation_space, probe_ma.single_action_space
    if env_cfg.get("backend", "gymnasium") == "envpool":
        pool = envpool_backend.make_vec_env(env_cfg, 0, 1, (), True, None)
        pool.close()
        return pool.single_observation_space, pool.single_action_space
    try:
        probe = _env_fn(env_cfg)()
    except UserError:
        raise
    except gym.error.DependencyNotInstalled as exc:
        raise UserError(f"{label!r}: a dependency is missing: {_missing_extra(str(exc))}") from None
    except Exception as exc:  # noqa: BLE001 - constructing a (user's) env can fail in any way
        raise UserError(f"{label!r}: the env could not be created with env.kwargs="
                        f"{dict(env_cfg.kwargs)} ({type(exc).__name__}: {exc})") from None
    try:
        check_spaces(probe.observation_space, probe.action_space, label)
        return probe.observation_space, probe.action_space
    finally:
        probe.close()


def make_vec_env(env_cfg: DictConfig, seed: int | list[int], num_envs: int | None = None,
                 render_mode: str | None = None, wrappers: Sequence[Callable[[gym.Env], gym.Env]] = (),
                 training: bool = False, step_cap: int | None = None, block: int | None = None,
                 opponents: OpponentPool | None = None) -> gym.vector.VectorEnv:
    """Build the vector env described by `env_cfg`, reset with seeds seed, seed+1, ... per sub-env. `training`:
    the envs PPO trains on (Atari: with episodic life and clipped rewards; evaluation envs have neither).
    `step_cap`: cut episodes at this many steps and say so (step_cap.py; evaluation). `wrappers`: more of ours
    around each env (video recording; gymnasium's backend only). `seed` may list every sub-env's seed, and `block`
    say how many envs each run of a batch has (run/batched.py: env.vectorization=native draws per block).
    `opponents`: a two-player game's (selfplay.py; its envs share the pool, reachable as envs.unwrapped.opponents;
    by default the random player alone)."""
    n = env_cfg.num_envs if num_envs is None else num_envs
    if is_multi_agent(env_cfg):  # copies x agents rows with statistics of their own (agents.py), or a game's seat
        envs = EnvFaults(_multi_agent(env_cfg, n, opponents, render_mode, wrappers), env_label(env_cfg),
                         evaluation=not training,
                         step_timeout=None)
        if not isinstance(envs.unwrapped, ParallelVectorEnv):
            envs = RecordEpisodeStatistics(envs)
        try:
            envs.reset(seed=seed)
        except BaseException:
            envs.close()
            raise
        return envs
    if env_cfg.get("backend", "gymnasium") == "envpool":
        if render_mode is None:
            return envpool_backend.make_vec_env(env_cfg, seed, n, wrappers, training, step_cap)
        # Recording (ppo-eval --video) plays on gymnasium's envs, which render one env per frame.
        env_cfg = envpool_backend.on_gymnasium(env_cfg)
    if native_vectorization(env_cfg) and render_mode is None and not wrappers and _never_cut(env_cfg, step_cap):
        envs = _native(env_cfg, n, block or n)
    else:  # video, or a step cap that can cut an episode (StepCap wraps each env): native means sync here
        envs = _vector(env_cfg, n, render_mode, wrappers, training, step_cap)
    # Atari: episodes report whole games with their raw scores (atari.GameStatistics), whatever PPO trains on.
    envs = atari.GameStatistics(envs) if env_cfg.get("atari") else RecordEpisodeStatistics(envs)
    try:
        envs.reset(seed=seed)
    except BaseException:  # async workers would outlive the error
        envs.close()
        raise
    return envs


def _never_cut(env_cfg: DictConfig, step_cap: int | None) -> bool:
    """Whether a step cap (evaluation's eval.max_episode_steps) can never cut an episode: the env's own time limit
    ends every episode first."""
    if step_cap is None:
        return True
    limit = env_cfg.max_episode_steps or resolve_env_id(env_cfg.id).max_episode_steps
    return limit is not None and limit <= step_cap


def native_vectorization(env_cfg: DictConfig) -> bool:
    """Whether the training envs run natively (native.py): env.vectorization=native, or auto where the env has a
    native vector env ppo-cli runs and nothing wraps each env."""
    mode = env_cfg.vectorization
    if mode == "auto":
        if env_cfg.get("backend", "gymnasium") != "gymnasium" or env_cfg.get("entry_point"):
            return False
        try:
            spec = resolve_env_id(env_cfg.id)
        except UserError:
            return False
        return runs_native(env_cfg, spec)
    return mode == "native"


def _native(env_cfg: DictConfig, n: int, block: int) -> gym.vector.VectorEnv:
    """env.vectorization=native (native.py): the env's own vector entry point, in blocks of `block` envs."""
    label = env_label(env_cfg)
    for key in PER_ENV_KEYS:
        if env_cfg.get(key):
            raise UserError(f"env.vectorization=native steps the env's own vector entry point, which env.{key} "
                            f"cannot wrap; use env.vectorization=sync")
    kwargs: dict[str, Any] = OmegaConf.to_container(env_cfg.kwargs, resolve=True)  # type: ignore[assignment]
    if env_cfg.max_episode_steps is not None:
        kwargs["max_episode_steps"] = env_cfg.max_episode_steps
    spec = resolve_env_id(env_cfg.id)
    native = make_native(label, spec, n, block, kwargs)
    check_spaces(native.single_observation_space, native.single_action_space, label)
    return EnvFaults(native, label, evaluation=False, step_timeout=None)


def _multi_agent(env_cfg: DictConfig, copies: int, opponents: OpponentPool | None, render_mode: str | None = None,
                 wrappers: Sequence[Callable[[Any], Any]] = ()) -> gym.vector.VectorEnv:
    """A PettingZoo env's copies: env.wrappers (PettingZoo ones, such as SuperSuit's) around each; `wrappers` (ours:
    video) around each seat of a game, or around the vector env of a parallel env's copies (agents.record)."""
    label = env_label(env_cfg)
    for key in ("obs_keys", "max_episode_steps"):
        if env_cfg.get(key):
            raise UserError(f"env.{key} applies to gymnasium envs; {label!r} is a PettingZoo env (set its episode "
                            f"length through its own env.kwargs, such as max_cycles)")
    if env_cfg.get("backend", "gymnasium") != "gymnasium" or env_cfg.vectorization not in ("auto", "sync"):
        raise UserError(f"{label!r} is a PettingZoo env: its copies step in this process (env.backend=gymnasium, "
                        f"env.vectorization=auto or sync)")
    kwargs: dict[str, Any] = OmegaConf.to_container(env_cfg.kwargs, resolve=True)  # type: ignore[assignment]
    factory, kind = env_kind(str(env_cfg.id), kwargs)
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    user_wrappers = _user_wrappers(env_cfg)
    if kind == "aec":  # a two-player game from the learner's seat (algo=selfplay)
        pool = opponents or OpponentPool(1)

        def game() -> Any:
            return apply_wrappers(factory(**kwargs), user_wrappers)

        def seat() -> gym.Env:
            env = TwoPlayerEnv(game, pool, label)
            for wrap in wrappers:
                env = wrap(env)
            return env

        envs = gym.vector.SyncVectorEnv([seat] * copies, autoreset_mode=AutoresetMode.SAME_STEP)
        envs.opponents = pool
    else:
        make = parallel_factory(str(env_cfg.id), kwargs)
        envs = ParallelVectorEnv(lambda: apply_wrappers(make(), user_wrappers), copies, label)
        for wrap in wrappers:
            envs = wrap(envs)
    check_spaces(envs.single_observation_space, envs.single_action_space, label)
    return envs


def _vector(env_cfg: DictConfig, n: int, render_mode: str | None, wrappers: Sequence[Callable[[gym.Env], gym.Env]],
            training: bool, step_cap: int | None) -> gym.vector.VectorEnv:
    is_async = env_cfg.vectorization == "async"
    ours = [*([partial(StepCap, max_steps=step_cap)] if step_cap is not None else []), *wrappers]
    # In async workers ReportCalls says which call of a sub-env failed (faults.py); EnvFaults does the rest.
    fn = _env_fn(env_cfg, render_mode, (*ours, ReportCalls) if is_async else ours, training)
    label = env_label(env_cfg)
    env_spaces(env_cfg)  # one env built here first, so a failure is one line rather than a worker's traceback
    vec_cls = gym.vector.AsyncVectorEnv if is_async else gym.vector.SyncVectorEnv
    # EnvFaults sits under the episode statistics, so a NaN reward is reported before anything adds it up; and the
    # statistics stay the outermost layer, which snapshot() saves.
    return EnvFaults(vec_cls([fn] * n, autoreset_mode=AutoresetMode.SAME_STEP), label, evaluation=not training,
                     step_timeout=env_cfg.get("step_timeout"))


def _missing_extra(message: str) -> str:
    """gymnasium's message names its own extras; name ours, which pin the same packages."""
    lowered = message.lower()
    for extra, words in (("mujoco", ("mujoco",)), ("box2d", ("box2d", "swig")), ("video", ("pygame",))):
        if any(w in lowered for w in words):
            return f"{message.split(',')[0].rstrip('.')}; {extra_hint(extra)}"
    return message


def check_env(env_cfg: DictConfig) -> list[str]:
    """Run gymnasium's env checker on one instance of the user's env; its warnings, or UserError if it fails."""
    from gymnasium.utils.env_checker import check_env as gym_check_env  # only env.check=true needs it

    env = _env_fn(env_cfg)()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            gym_check_env(env.unwrapped, skip_render_check=True)
        except Exception as exc:  # noqa: BLE001 - the checker raises assertion and type errors alike
            raise UserError(f"env.check: {env_label(env_cfg)!r} fails gymnasium's env checker: "
                            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                            ) from None
        finally:
            env.close()
    return sorted({str(w.message).strip() for w in caught})


# --- Saving and restoring the envs' own state, so that a resumed run continues the same episodes. ---
# Only plain values are kept (numbers, arrays, RNG states, and deques of them, such as FrameStackObservation's
# frames), so a checkpoint stays loadable with weights_only=True. An env that holds anything else (a physics
# engine, an emulator, a window) cannot be restored this way; such runs resume from freshly reset envs and say so.

_PLAIN = (bool, int, float, str, type(None))
# Settings rather than state, rebuilt from the config: spaces, specs, modes.
_SKIP_TYPES = (gym.Space, EnvSpec, Enum)
_SKIP_KEYS = {"env", "metadata", "spec", "_np_random", "_cached_spec"}


def _plain(value: Any) -> Any:
    """Value as checkpoint-safe data, or raise TypeError."""
    # numpy scalars first: np.float64 is also a float, but torch's safe loader refuses it inside a checkpoint.
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return {"__npscalar__": torch.from_numpy(np.asarray(value).copy())}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return {"__ndarray__": torch.from_numpy(value.copy())}
    if isinstance(value, (tuple, list)):
        return {"__seq__": [_plain(v) for v in value], "tuple": isinstance(value, tuple)}
    if isinstance(value, deque):
        return {"__deque__": [_plain(v) for v in value], "maxlen": value.maxlen}
    if isinstance(value, np.random.Generator):  # its bit generator's state: plain numbers
        return {"__rng__": _plain(value.bit_generator.state)}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _plain(v) for k, v in value.items()}}
    raise TypeError(type(value).__name__)


def _unplain(value: Any) -> Any:
    if isinstance(value, dict) and "__npscalar__" in value:
        return value["__npscalar__"].numpy()[()]
    if isinstance(value, dict) and "__ndarray__" in value:
        return value["__ndarray__"].numpy().copy()
    if isinstance(value, dict) and "__seq__" in value:
        items = [_unplain(v) for v in value["__seq__"]]
        return tuple(items) if value["tuple"] else items
    if isinstance(value, dict) and "__rng__" in value:
        state = _unplain(value["__rng__"])
        kind = getattr(np.random, str(state["bit_generator"]), None)
        if not (isinstance(kind, type) and issubclass(kind, np.random.BitGenerator)):
            raise TypeError(f"an unknown bit generator {state['bit_generator']!r}")
        bits = kind()
        bits.state = state
        return np.random.Generator(bits)
    if isinstance(value, dict) and "__deque__" in value:
        return deque((_unplain(v) for v in value["__deque__"]), maxlen=value["maxlen"])
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


def _is_object(value: Any) -> bool:
    return hasattr(value, "__dict__") and not isinstance(value, (type, ModuleType)) and not callable(value)


def _renderer(value: Any) -> bool:
    # A renderer's objects (pygame's screen and fonts) are drawn from the state, not part of it.
    return type(value).__module__.split(".")[0] == "pygame"


def _settings(value: Any) -> bool:
    """What _snapshot_tree leaves out: settings rather than state (spaces, specs), functions, renderers."""
    return isinstance(value, _SKIP_TYPES) or callable(value) or _renderer(value)


_TREE_SKIP_KEYS = _SKIP_KEYS - {"env", "_np_random"}  # a tree goes through wrappers (env) and their generators


def _children(value: Any) -> list[Any] | None:
    return (list(value.values()) if isinstance(value, dict) else list(value) if isinstance(value, (list, tuple))
            else None)


def _snapshot_tree(obj: Any, seen: set[int] | None = None) -> dict[str, Any]:
    """_snapshot_obj through the env's own objects too: the wrappers around it (SuperSuit's frame stacks), its world
    of agents and landmarks (MPE's). Each attribute is plain data, or an object (a list, a dict of them) saved the
    same way, each object once. Raises TypeError naming what cannot be saved."""
    seen = set() if seen is None else seen
    seen.add(id(obj))
    state: dict[str, Any] = {}
    for key, value in vars(obj).items():
        if key in _TREE_SKIP_KEYS or _settings(value):
            continue
        try:
            state[key] = _plain(value)
            continue
        except TypeError:
            pass
        items = _children(value)
        if _is_object(value):
            if id(value) not in seen:
                state[key] = {"__obj__": _snapshot_tree(value, seen)}
        elif items is not None and all(_settings(v) for v in items):
            continue  # settings: a dict of spaces
        elif items is not None and all(_is_object(v) for v in items):
            state[key] = {"__objs__": [{} if id(v) in seen else _snapshot_tree(v, seen) for v in items]}
        else:
            raise TypeError(f"{type(obj).__name__}.{key} ({type(value).__name__})")
    return state


def _restore_tree(obj: Any, saved: dict[str, Any]) -> None:
    """_snapshot_tree's state back into an env of the same build: into its objects, a generator's state in place.
    It writes only where the snapshot would have read: a file's other names and kinds touch nothing and are refused
    (TypeError). An attribute the fresh env lacks (one that an env creates as it runs) is set if it is plain data."""
    own = vars(obj)
    for key, value in saved.items():
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("__") or key in _TREE_SKIP_KEYS:
            raise TypeError(f"a saved attribute named {str(key)[:40]!r}")
        current = own.get(key)
        nested = isinstance(value, dict) and ("__obj__" in value or "__objs__" in value)
        if key in own and _settings(current) or (nested and key not in own):
            raise TypeError(f"{type(obj).__name__}.{key} is not state the checkpoint can hold")
        if isinstance(value, dict) and "__obj__" in value:
            if not _is_object(current):
                raise TypeError(f"{type(obj).__name__}.{key} is not an object here")
            _restore_tree(current, value["__obj__"])
        elif isinstance(value, dict) and "__objs__" in value:
            kids = _children(current)
            if kids is None or len(kids) != len(value["__objs__"]) or not all(_is_object(k) for k in kids):
                raise TypeError(f"{type(obj).__name__}.{key} does not hold the checkpoint's "
                                f"{len(value['__objs__'])} objects")
            for kid, kid_saved in zip(kids, value["__objs__"], strict=True):
                _restore_tree(kid, kid_saved)
        elif isinstance(value, dict) and "__rng__" in value and isinstance(current, np.random.Generator):
            current.bit_generator.state = _unplain(value["__rng__"])  # others may hold the same generator
        else:
            setattr(obj, key, _unplain(value))


def snapshot(envs: gym.vector.VectorEnv) -> tuple[list[Any] | None, str | None]:
    """(state, None) for envs whose full state is plain data, else (None, reason)."""
    if isinstance(envs.unwrapped, ParallelVectorEnv):  # each copy's state, and the rows' own counts
        try:
            return [{}, {"native": envs.unwrapped.snapshot_state(_snapshot_tree, _plain)}], None
        except TypeError as exc:
            return None, f"the PettingZoo env holds state that cannot be saved: {exc}"
    native = getattr(envs.unwrapped, "snapshot_state", None)
    if native is not None:  # a native vector env (native.py) saves its own state
        return [_snapshot_obj(envs), {"native": _plain(native())}], None
    if not isinstance(envs.unwrapped, gym.vector.SyncVectorEnv):
        # A backend's own vector env says why where it knows better (envpool_backend.SameStepPool).
        return None, getattr(envs.unwrapped, "unsaved_because", "only sync vector envs can be saved")
    try:
        stats = _snapshot_obj(envs)  # RecordEpisodeStatistics: returns so far of the running episodes
        per_env = [[_snapshot_obj(layer) for layer in _layers(e)] for e in envs.unwrapped.envs]
    except TypeError as exc:
        return None, f"the env holds state that cannot be saved: {exc}"
    return [stats, per_env], None


def restorable(envs: gym.vector.VectorEnv, state: list[Any] | None) -> bool:
    """Whether `state` (a snapshot) is of envs like `envs`: a native vector env's of a native one, sync envs' of sync
    envs (a checkpoint of one kind resumed with env.vectorization of another restarts its episodes)."""
    if state is None:
        return False
    native = hasattr(envs.unwrapped, "restore_state")
    return isinstance(state[1], dict) == native and (native or isinstance(envs.unwrapped, gym.vector.SyncVectorEnv))


def restore(envs: gym.vector.VectorEnv, state: list[Any]) -> None:
    stats, per_env = state
    pairs = [(envs, stats)]
    if isinstance(envs.unwrapped, ParallelVectorEnv):
        try:
            envs.unwrapped.restore_state(per_env["native"], _restore_tree, _unplain)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise UserError(f"cannot resume: the checkpoint's env state does not fit these envs ({exc}); the env's "
                            f"settings (env.kwargs) must be the checkpoint's") from None
        return
    if isinstance(per_env, dict):  # a native vector env's own state
        envs.unwrapped.restore_state(_unplain(per_env["native"]))
    else:
        for env, layers in zip(envs.unwrapped.envs, per_env, strict=True):
            pairs += list(zip(_layers(env), layers, strict=True))
    for obj, saved in pairs:
        for key, value in saved.items():
            if key == "_np_random":
                obj._np_random.bit_generator.state = value
            else:
                setattr(obj, key, _unplain(value))
