"""Small gymnasium wrappers that ppo-cli's presets use and users can point at their own envs (env.wrappers). A public
module under a stable name: configs and checkpoints name its wrappers (ppo_cli.wrappers.KeepObservationIndices)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np


class KeepObservationIndices(gym.ObservationWrapper):
    """Keep only the given entries of a flat Box observation: a partially observed version of an env.

        env.wrappers='[{_target_: ppo_cli.wrappers.KeepObservationIndices, indices: [0, 2]}]'

    on CartPole-v1 keeps the cart position and the pole angle and drops both velocities (`env=CartPoleNoVel-v1`),
    so a policy must remember earlier observations to infer them: the usual test of a recurrent policy.
    """

    def __init__(self, env: gym.Env, indices: Sequence[int]) -> None:
        super().__init__(env)
        space = env.observation_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise ValueError(f"KeepObservationIndices needs a flat Box observation space, not {space}")
        self.indices = np.asarray(list(indices), dtype=np.int64)
        if self.indices.size == 0 or self.indices.min() < -space.shape[0] or self.indices.max() >= space.shape[0]:
            raise ValueError(f"indices {list(indices)} do not fit an observation of {space.shape[0]} entries")
        self.observation_space = gym.spaces.Box(space.low[self.indices], space.high[self.indices],
                                                dtype=space.dtype)

    def observation(self, observation: Any) -> np.ndarray:
        return np.asarray(observation)[self.indices]
