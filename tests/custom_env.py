"""Envs a user would write: imported by the tests' subprocesses as `tests.custom_env`."""

import gymnasium as gym
import numpy as np


class Corridor(gym.Env):
    """Walk right along a corridor of `length` cells to the goal; each step costs 0.01, the goal pays 1."""

    def __init__(self, length: int = 5):
        self.length = length
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)  # 0: left, 1: right
        self.pos = 0

    def _obs(self):
        return np.array([self.pos / self.length], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos = 0
        return self._obs(), {}

    def step(self, action):
        self.pos = max(0, self.pos + (1 if action == 1 else -1))
        at_goal = self.pos >= self.length
        return self._obs(), (1.0 if at_goal else -0.01), at_goal, False, {}


class BrokenCorridor(Corridor):
    """Returns observations outside its declared space: gymnasium's env checker must reject it."""

    def _obs(self):
        return np.array([5.0], dtype=np.float32)


gym.register("Corridor-v0", entry_point="tests.custom_env:Corridor", max_episode_steps=40)
