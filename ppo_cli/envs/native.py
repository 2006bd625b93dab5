"""env.vectorization=native: gymnasium's natively vectorized envs (its `vector_entry_point`, one numpy step for
all the envs; CartPole-v0/v1's CartPoleVectorEnv) run in SAME_STEP autoreset, as make.py's other vector envs.

gymnasium's vector CartPole resets an ended episode at the next step (NEXT_STEP), from one random stream for all
its envs. `SameStepCartPole` keeps its physics and resets an ended episode within the step that ended it, its
first state drawn from the random stream of the env's block: the envs are blocks of `block` (a run's
env.num_envs), each seeded from its first env's seed, so a batch of runs (run/batched.py), one block per run,
draws what each run alone draws. Ended episodes' final observations are in info["final_obs"], as SyncVectorEnv's
SAME_STEP mode gives them.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode

from ppo_cli.errors import UserError


class _TwoActions(gym.spaces.MultiDiscrete):
    """CartPoleVectorEnv's action space (each env's 0 or 1), checked in two numpy calls: its step asserts
    `contains` on every step, which MultiDiscrete's general test made a fifth of the step's time."""

    def contains(self, x: Any) -> bool:
        return (isinstance(x, np.ndarray) and x.shape == self.shape and x.dtype.kind in "iu"
                and not (x & ~1).any())


class SameStepCartPole(gym.vector.VectorEnv):

    def __init__(self, env: CartPoleVectorEnv, block: int) -> None:
        space = env.action_space
        if isinstance(space, gym.spaces.MultiDiscrete) and (space.nvec == 2).all() and not space.start.any():
            env.action_space = _TwoActions(space.nvec, space.dtype, seed=None, start=space.start)
        self.env, self.block = env, block
        self.num_envs = env.num_envs
        self.single_observation_space, self.single_action_space = env.single_observation_space, env.single_action_space
        self.observation_space, self.action_space = env.observation_space, env.action_space
        self.metadata = {**env.metadata, "autoreset_mode": AutoresetMode.SAME_STEP}
        self.render_mode, self.spec = None, env.spec
        self.rngs: list[np.random.Generator] = []
        self.bounds = (-0.05, 0.05)

    def _blocks(self, seed: int | list[int] | None) -> None:
        blocks = range(0, self.num_envs, self.block)
        if seed is None and self.rngs:
            return
        if seed is None or isinstance(seed, int):
            seeds = [None if seed is None else seed + start for start in blocks]
        else:
            seeds = [seed[start] for start in blocks]
        self.rngs = [seeding.np_random(s)[0] for s in seeds]

    def _draw(self, rows: np.ndarray) -> None:
        """New episodes' first states in envs `rows` (sorted), each block's from its own stream."""
        owner = rows // self.block
        for b in np.unique(owner):
            mine = rows[owner == b]
            self.env.state[:, mine] = self.rngs[b].uniform(*self.bounds, size=(4, len(mine)))
        self.env.steps[rows] = 0

    def reset(self, *, seed: int | list[int] | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        self.env.reset(options=options)  # its settings (reset bounds from options, counters)
        self.bounds = (self.env.low, self.env.high)
        self._blocks(seed)
        self._draw(np.arange(self.num_envs))
        return self._observations(), {}

    def _observations(self) -> np.ndarray:
        # Row-major, as a sync vector env's: the torch policy's matmuls then read rows as a single run's do (a
        # column-major batch takes another BLAS path, with other rounding).
        return np.ascontiguousarray(self.env.state.T, dtype=np.float32)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        _, reward, terminated, truncated, _ = self.env.step(actions)
        obs = self._observations()
        done = terminated | truncated
        info: dict[str, Any] = {}
        if done.any():
            rows = np.flatnonzero(done)
            final = np.full(self.num_envs, None, dtype=object)
            for i in rows:
                final[i] = obs[i].copy()
            info = {"final_obs": final, "_final_obs": done.copy(),
                    "final_info": {}, "_final_info": np.zeros(self.num_envs, dtype=bool)}
            self._draw(rows)
            self.env.prev_done = np.zeros(self.num_envs, dtype=bool)  # reset here, not at its next step
            obs[rows] = self.env.state[:, rows].T
        return obs, reward, terminated, truncated, info

    def snapshot_state(self) -> dict[str, Any]:
        """What a checkpoint keeps to continue the episodes in progress (envs/make.py's snapshot)."""
        return {"state": self.env.state.copy(), "steps": self.env.steps.copy(), "bounds": list(self.bounds),
                "rngs": [rng.bit_generator.state for rng in self.rngs]}

    def restore_state(self, saved: dict[str, Any]) -> None:
        self.env.state, self.env.steps = saved["state"].copy(), saved["steps"].copy()
        self.env.prev_done = np.zeros(self.num_envs, dtype=bool)
        self.bounds = tuple(saved["bounds"])
        self._blocks(0)
        for rng, state in zip(self.rngs, saved["rngs"], strict=True):
            rng.bit_generator.state = state

    def close_extras(self, **kwargs: Any) -> None:
        self.env.close()


NATIVE = {CartPoleVectorEnv: SameStepCartPole}
# What env.vectorization=auto runs natively: the registered vector entry points that NATIVE adapts.
NATIVE_ENTRY_POINTS = {"gymnasium.envs.classic_control.cartpole:CartPoleVectorEnv"}
PER_ENV_KEYS = ("wrappers", "obs_keys", "entry_point", "atari")  # settings that wrap each env: no native env then


def runs_native(env_cfg: Any, spec: gym.envs.registration.EnvSpec | None) -> bool:
    """Whether env.vectorization=auto steps these envs natively."""
    return (spec is not None and spec.vector_entry_point in NATIVE_ENTRY_POINTS
            and not any(env_cfg.get(key) for key in PER_ENV_KEYS))


def make_native(env_id: str, spec: gym.envs.registration.EnvSpec, num_envs: int, block: int,
                kwargs: dict[str, Any]) -> gym.vector.VectorEnv:
    """The native vector env of `spec` for `num_envs` envs in blocks of `block`, or one line saying why not."""
    why = (f"env.vectorization=native: {env_id!r} has no numpy vector entry point that ppo-cli runs in SAME_STEP "
           f"mode (CartPole-v0 and CartPole-v1 have); use env.vectorization=sync or async")
    if not spec.vector_entry_point:
        raise UserError(why)
    try:
        env = gym.make_vec(spec.id, num_envs=num_envs, vectorization_mode="vector_entry_point", **kwargs)
    except Exception as exc:  # noqa: BLE001 - a vector entry point can fail in any way
        raise UserError(f"env.vectorization=native: {env_id!r} could not be created with env.kwargs={kwargs} "
                        f"({type(exc).__name__}: {exc})") from None
    adapter = NATIVE.get(type(env))
    if adapter is None:
        env.close()
        raise UserError(why)
    return adapter(env, block)
