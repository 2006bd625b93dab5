"""The evaluation step cap: an env without a time limit and a policy that never finishes would otherwise play one
episode forever. make_vec_env(step_cap=N) applies it (both backends: envpool's pool counts it itself)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym

CUT_KEY = "eval_cut"  # the info key of the step where StepCap cut an episode


class StepCap(gym.Wrapper):
    """Truncates an episode that reaches `max_steps` steps. The step that cuts puts the episode's return and length
    in `info[CUT_KEY]` so that `run_episodes` counts it as cut; they are counted here, not read from the episode
    statistics, because wrappers below this one (Atari's game score) do not see the cut as the end of an episode."""

    def __init__(self, env: gym.Env, max_steps: int) -> None:
        super().__init__(env)
        self.max_steps = max_steps
        self.total, self.length = 0.0, 0

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self.total, self.length = 0.0, 0
        return self.env.reset(**kwargs)

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.total += float(reward)
        self.length += 1
        if self.length >= self.max_steps and not (terminated or truncated):
            truncated = True
            info = {**info, CUT_KEY: {"r": self.total, "l": self.length}}
        return obs, reward, terminated, truncated, info
