"""env.backend=envpool: envpool's C++ vector envs behind the interface of ppo-cli's gymnasium vector envs.

Autoreset. envpool resets an env on the step *after* the one that ends its episode (NEXT_STEP: that step ignores
the action and returns the first observation with reward 0), while the rollout needs gymnasium's SAME_STEP mode
(make.py). `SameStepPool` gives it: after a step that ends episodes it steps those envs alone at once, which
envpool answers with their reset, hands back their first observations in place of the final ones, and puts the real
final observations in `info["final_obs"]` and the ending step's info in `info["final_info"]`, as gymnasium's vector
envs do. So no stored transition crosses a reset, a truncation bootstraps from the real final observation, and
gymnasium's RecordEpisodeStatistics counts the episodes as on gymnasium's envs.

Atari (env.atari=true): envpool's own preprocessing with the settings of ppo-cli's pipeline (atari.py: no-ops 30,
frame skip 4 with max-pooling, 84x84 gray, 4 frames, sticky actions 0.25 and the minimal action set unless env.kwargs
says otherwise, FIRE after a reset; episodic life always, reward clipping for training only). The whole game's raw
score and length go out as `info["final_info"]["game"]`, which atari.GameStatistics reports as the episode, as
atari.GameScore's do. Evaluation envs (training=False) play whole games: a lost life only restarts play through
envpool's reset (no-ops, FIRE), which the caller never sees as an episode end.
"""

from __future__ import annotations

import copy
import difflib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space
from gymnasium.wrappers.vector import RecordEpisodeStatistics
from omegaconf import DictConfig, OmegaConf

from ppo_cli.config import env_label
from ppo_cli.envs import atari
from ppo_cli.envs.faults import EnvFaults
from ppo_cli.envs.spaces import check_spaces
from ppo_cli.envs.step_cap import CUT_KEY
from ppo_cli.errors import UserError, extra_hint

# The envpool task families this backend covers (tested): their ids are gymnasium's own (ALE/<Game>-v5 for Atari).
FAMILIES = {"envpool.classic_control": "classic control", "envpool.box2d": "Box2D", "envpool.mujoco.gym": "MuJoCo",
            "envpool.atari": "Atari"}
# envpool's settings that the backend sets itself from ppo-cli's config (num_envs, seeds, the time limit).
OWN_KEYS = {"num_envs", "batch_size", "seed", "env_seed", "max_episode_steps", "base_path", "max_num_players",
            "gym_reset_return_info"}
# Settings of envpool's thread pool, not of the env: env.kwargs may set them; gymnasium's envs never see them.
POOL_KEYS = ("num_threads", "thread_affinity_offset")
# gymnasium selects these variants by a keyword (LunarLander-v3 with continuous=true), envpool by id.
VARIANT_KWARGS = {"continuous": "Continuous", "hardcore": "Hardcore"}


def atari_options(training: bool) -> dict[str, Any]:
    """envpool's Atari settings for ppo-cli's pipeline (atari.py). Life loss ends an episode in envpool for training
    and evaluation alike, so that a new life starts with envpool's reset (no-ops, FIRE) in both; SameStepPool hides
    those ends from evaluation."""
    return {"noop_max": atari.NOOP_MAX, "frame_skip": atari.FRAME_SKIP, "img_height": atari.SCREEN_SIZE,
            "img_width": atari.SCREEN_SIZE, "gray_scale": True, "stack_num": atari.FRAME_STACK, "use_fire_reset": True,
            "episodic_life": True, "reward_clip": training, "zero_discount_on_life_loss": False,
            "use_inter_area_resize": True}


def import_envpool() -> Any:
    try:
        import envpool
    except ImportError as exc:
        raise UserError(f"env.backend=envpool needs envpool ({exc}): {extra_hint('envpool')}, or use "
                        f"env.backend=gymnasium") from None
    return envpool


def task_and_kwargs(env_cfg: DictConfig, training: bool) -> tuple[str, dict[str, Any]]:
    """envpool's task id for env.id and the keyword arguments of envpool.make (without num_envs and seed), or a
    UserError naming the problem and the alternative."""
    envpool = import_envpool()
    from envpool.registration import registry

    env_id = str(env_cfg.id)
    other = "use env.backend=gymnasium"
    if env_cfg.get("entry_point") or ":" in env_id:
        what = f"env.entry_point={env_cfg.entry_point}" if env_cfg.get("entry_point") else f"env.id={env_id}"
        raise UserError(f"{what}: env.backend=envpool runs envpool's own tasks only; {other}")
    if env_cfg.get("wrappers"):
        raise UserError(f"env.wrappers: gymnasium wrappers cannot wrap envpool's C++ envs; {other}")
    kwargs: dict[str, Any] = OmegaConf.to_container(env_cfg.kwargs, resolve=True)  # type: ignore[assignment]
    is_atari = bool(env_cfg.get("atari"))
    if is_atari:
        if not env_id.startswith("ALE/"):
            raise UserError(f"env.atari=true: {env_id!r} is not an Atari game (an ALE id such as ALE/Breakout-v5)")
        task = env_id.removeprefix("ALE/")
        kwargs = atari.env_kwargs(kwargs, env_id)  # refuses env.kwargs.frameskip, adds the ALE defaults
        del kwargs["frameskip"]
    else:
        task = env_id.removeprefix("ALE/")  # an Atari game without env.atari: refused below, naming the fix
        for key, infix in VARIANT_KWARGS.items():
            name, _, version = env_id.rpartition("-")
            if kwargs.get(key) is True and f"{name}{infix}-{version}" in registry.specs:
                task = f"{name}{infix}-{version}"
                del kwargs[key]
    entry = registry.specs.get(task)
    if entry is None:
        close = difflib.get_close_matches(task, envpool.list_all_envs(), n=3, cutoff=0.6)
        hint = f" (envpool has {', '.join(close)})" if close else ""
        raise UserError(f"env.id={env_id!r}: envpool {envpool.__version__} does not provide this task{hint}; {other}")
    family = entry[0]
    if family not in FAMILIES:
        raise UserError(f"env.id={env_id!r}: env.backend=envpool covers envpool's "
                        f"{', '.join(FAMILIES.values())} tasks, not {family}; {other}")
    if (family == "envpool.atari") != is_atari:
        raise UserError(f"env.id={env_id!r}: envpool runs Atari games through ppo-cli's pipeline only: use "
                        f"env.id=ALE/{task} env.atari=true")
    config_keys = set(envpool.make_spec(task).config._fields)
    fixed = set(atari_options(training)) if is_atari else set()
    for key in kwargs:
        if key not in config_keys or key in OWN_KEYS or key in fixed:
            reason = ("env.atari=true sets it" if key in fixed else "set by ppo-cli" if key in OWN_KEYS
                      else f"envpool's {task} takes {', '.join(sorted(config_keys - OWN_KEYS - fixed))}")
            raise UserError(f"env.kwargs.{key}: not an envpool setting here ({reason}); {other} for gymnasium's "
                            f"keyword arguments")
    if is_atari:
        kwargs.update(atari_options(training))
    if env_cfg.max_episode_steps is not None:
        # On an Atari env it counts emulator frames (docs/pixels.md); envpool counts agent steps of FRAME_SKIP frames.
        frames_per_step = atari.FRAME_SKIP if is_atari else 1
        kwargs["max_episode_steps"] = -(-int(env_cfg.max_episode_steps) // frames_per_step)
    return task, kwargs


class SameStepPool(gym.vector.VectorEnv):
    """envpool's sync vector env in gymnasium's SAME_STEP autoreset mode (module doc).

    `make(seed)` builds the pool (env i seeded seed + i, as envpool does). `whole_games`: Atari evaluation, where a
    lost life is not an episode end. `cap`: evaluation's step cap (step_cap.StepCap's), counted here.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}
    unsaved_because = "envpool's envs live in C++ and cannot be saved"  # envs.snapshot's reason

    def __init__(self, make: Callable[[int], Any], seed: int, is_atari: bool = False, whole_games: bool = False,
                 cap: int | None = None) -> None:
        self._make, self._seed = make, seed
        self.pool = make(seed)
        self._fresh = True  # not reset since it was made: reset(seed=its seed) needs no new pool
        self.num_envs = int(self.pool.num_envs)
        self.single_observation_space = self.pool.observation_space
        space = self.pool.action_space
        if isinstance(space, gym.spaces.Box) and space.dtype == np.float64:
            # gymnasium's MuJoCo envs take float32 actions; envpool's float64 Box would make the policy (and its
            # checkpoint's action space) differ between the backends. envpool casts actions to its dtype.
            space = gym.spaces.Box(space.low.astype(np.float32), space.high.astype(np.float32), dtype=np.float32)
        self.single_action_space = space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.is_atari, self.whole_games, self.cap = is_atari, whole_games, cap
        self._idle = np.zeros((self.num_envs, *space.shape), dtype=space.dtype)  # actions that the resets ignore
        self._game_score = np.zeros(self.num_envs)
        self._game_length = np.zeros(self.num_envs, dtype=np.int64)
        self._cap_return = np.zeros(self.num_envs)
        self._cap_length = np.zeros(self.num_envs, dtype=np.int64)
        self._none = np.zeros(self.num_envs, dtype=bool)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """Reset every env; `seed` reseeds as gymnasium does (env i gets seed + i), which envpool can only do by
        building the pool again."""
        if options:
            raise ValueError(f"SameStepPool.reset takes no options, got {sorted(options)}")
        if seed is not None and not (self._fresh and seed == self._seed):
            self.pool.close()
            self.pool, self._seed = self._make(seed), seed
        self._fresh = False
        obs, info = self.pool.reset()
        for counter in (self._game_score, self._game_length, self._cap_return, self._cap_length):
            counter[:] = 0
        return obs, _plain_info(info)

    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.pool.step(np.asarray(actions))
        self._fresh = False
        info = _plain_info(info)
        ended = terminated | truncated
        restart = ended  # envpool's ends (the episodes that ended, and in whole-game evaluation the lost lives)
        cut = self._none  # the episodes that the step cap ends, of which envpool knows nothing
        stats: dict[str, tuple[dict[str, np.ndarray], np.ndarray]] = {}  # final_info key: (r and l, which envs)
        if self.is_atari:
            self._game_score += info["reward"]  # envpool's unclipped reward
            self._game_length += 1
            game_over = ended & (info["terminated"].astype(bool) | truncated)
            if self.whole_games:
                terminated, ended = terminated & game_over, game_over
            stats["game"] = ({"r": self._game_score.copy(), "l": self._game_length.copy()}, game_over)
            self._game_score[game_over], self._game_length[game_over] = 0.0, 0
        if self.cap is not None:
            self._cap_return += reward
            self._cap_length += 1
            cut = (self._cap_length >= self.cap) & ~ended
            stats[CUT_KEY] = ({"r": self._cap_return.copy(), "l": self._cap_length.copy()}, cut)
            truncated, ended = truncated | cut, ended | cut
            self._cap_return[ended], self._cap_length[ended] = 0.0, 0
            self._game_score[cut], self._game_length[cut] = 0.0, 0  # a cut game is dropped: the next starts afresh
        if not (restart.any() or cut.any()):
            return obs, reward, terminated, truncated, info
        if ended.any():
            final_obs = np.empty(self.num_envs, dtype=object)
            for i in np.flatnonzero(ended):
                final_obs[i] = obs[i].copy()  # a view of the row that a reset below overwrites
            final_info = {k: v.copy() for k, v in info.items()} | {"_" + k: ended for k in info}
            for key, (values, which) in stats.items():
                if which.any():
                    final_info |= {key: values, "_" + key: which}
        # envpool's own ends: a step of just these envs, which envpool answers with the reset it would have done on the
        # next step (the action is ignored). Not reset(env_id): that one is forced, and restarts an Atari game where a
        # lost life must only restart play. A cut episode did not end for envpool: it needs the forced reset.
        for which, forced in ((restart & ~cut, False), (cut, True)):
            if not which.any():
                continue
            ids = np.flatnonzero(which).astype(np.int32)
            first_obs, first_info = self.pool.reset(ids) if forced else self._autoreset(ids)
            rows = first_info["env_id"]
            obs[rows] = first_obs
            for key, value in _plain_info(first_info).items():
                info[key][rows] = value
        if ended.any():
            info |= {"final_obs": final_obs, "_final_obs": ended, "final_info": final_info, "_final_info": ended}
        return obs, reward, terminated, truncated, info

    def _autoreset(self, ids: np.ndarray) -> tuple[Any, dict[str, Any]]:
        first_obs, _, _, _, first_info = self.pool.step(self._idle[:ids.size], ids)
        return first_obs, first_info

    def close_extras(self, **kwargs: Any) -> None:
        self.pool.close()


def _plain_info(info: dict[str, Any]) -> dict[str, Any]:
    """envpool's info without its bookkeeping (which env and player a row is: the rows are in env order)."""
    return {k: v for k, v in info.items() if k not in ("env_id", "players")}


def on_gymnasium(env_cfg: DictConfig) -> DictConfig:
    """The same env on gymnasium's backend (envpool's pool settings dropped from env.kwargs)."""
    cfg = copy.deepcopy(env_cfg)
    OmegaConf.set_readonly(cfg, False)
    cfg.backend = "gymnasium"
    cfg.kwargs = {k: v for k, v in env_cfg.kwargs.items() if k not in POOL_KEYS}
    return cfg


def make_vec_env(env_cfg: DictConfig, seed: int, num_envs: int, wrappers: Sequence[Callable[[Any], Any]],
                 training: bool, step_cap: int | None) -> gym.vector.VectorEnv:
    """make.make_vec_env for env.backend=envpool: the same vector env interface (SAME_STEP autoreset, episode
    statistics; Atari: game scores), the step cap counted by the pool."""
    if env_cfg.get("obs_keys") is not None:
        raise UserError("env.obs_keys selects keys of gymnasium's Dict observations; use env.backend=gymnasium")
    if wrappers:
        names = ", ".join(repr(getattr(w, "__name__", w)) for w in wrappers)
        raise UserError(f"env.backend=envpool cannot apply the wrapper {names} to envpool's C++ envs; use "
                        f"env.backend=gymnasium")
    task, kwargs = task_and_kwargs(env_cfg, training)
    envpool = import_envpool()
    label = env_label(env_cfg)

    def make(env_seed: int) -> Any:
        with warnings.catch_warnings():  # envpool gives its Box spaces float64 bounds, which gymnasium casts, warning
            warnings.filterwarnings("ignore", message=".*precision lowered by casting")
            pool = envpool.make(task, env_type="gymnasium", num_envs=num_envs, batch_size=num_envs, seed=env_seed,
                                **kwargs)
            pool.observation_space, pool.action_space  # noqa: B018 - built on first use: here, quietly
        return pool

    try:
        envs = SameStepPool(make, seed, bool(env_cfg.get("atari")), not training, step_cap)
    except Exception as exc:  # noqa: BLE001 - envpool's C++ raises its own kinds for bad settings
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"{label!r}: envpool could not create {task} with env.kwargs={dict(env_cfg.kwargs)} "
                        f"({type(exc).__name__}: {first})") from None
    check_spaces(envs.single_observation_space, envs.single_action_space, label)
    # As on gymnasium's backend: faults (a MuJoCo simulation gone NaN, say) in one line, under the statistics;
    # Atari's report whole games with their raw scores.
    faults = EnvFaults(envs, label, evaluation=not training)
    return atari.GameStatistics(faults) if env_cfg.get("atari") else RecordEpisodeStatistics(faults)
