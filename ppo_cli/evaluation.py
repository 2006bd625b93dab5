"""Scoring a policy: N whole episodes in a vector env. Used by ppo-eval and after training (one code path).

Each sub-env is given a fixed quota of episodes up front. Taking "the first N episodes to finish" instead
would favour short episodes, since envs that fail fast report first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from ppo_cli.policy import ActorCritic


@dataclass
class EvalResult:
    returns: list[float]
    lengths: list[int]

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std_return(self) -> float:
        return float(np.std(self.returns))

    @property
    def mean_length(self) -> float:
        return float(np.mean(self.lengths))

    def summary(self) -> dict[str, float | int]:
        return {"mean_return": self.mean_return, "std_return": self.std_return,
                "min_return": float(np.min(self.returns)), "max_return": float(np.max(self.returns)),
                "mean_length": self.mean_length, "episodes": len(self.returns)}


def run_episodes(envs: gym.vector.VectorEnv, act: Callable[[np.ndarray], np.ndarray], episodes: int,
                 seed: int) -> EvalResult:
    """Play `episodes` episodes with `act(obs batch) -> action batch`; envs must record episode statistics."""
    n = envs.num_envs
    quota = np.array([(episodes + i) // n for i in range(n)])
    done = np.zeros(n, dtype=int)
    returns: list[float] = []
    lengths: list[int] = []
    obs, _ = envs.reset(seed=seed)
    while (done < quota).any():
        obs, _, _, _, info = envs.step(act(obs))
        if "_episode" in info:
            for i in np.flatnonzero(info["_episode"]):
                if done[i] < quota[i]:
                    returns.append(float(info["episode"]["r"][i]))
                    lengths.append(int(info["episode"]["l"][i]))
                    done[i] += 1
    return EvalResult(returns, lengths)


def evaluate(policy: ActorCritic, envs: gym.vector.VectorEnv, episodes: int, seed: int,
             deterministic: bool = True, device: torch.device | str = "cpu") -> EvalResult:
    """Deterministic (the most likely action; a Gaussian's mean) by default; stochastic samples from a
    generator seeded with `seed`."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def act(obs: np.ndarray) -> np.ndarray:
        action, _, _ = policy.act(torch.as_tensor(obs, device=device), generator, deterministic)
        return policy.env_action(action)

    return run_episodes(envs, act, episodes, seed)


def evaluate_random(envs: gym.vector.VectorEnv, episodes: int, seed: int) -> EvalResult:
    """The uniformly random policy on the same seeds: the floor a trained policy is compared against."""
    envs.action_space.seed(seed)
    return run_episodes(envs, lambda _: envs.action_space.sample(), episodes, seed)
