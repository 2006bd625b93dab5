"""Tiny PettingZoo parallel envs for the multi-agent tests (env.id=tests.ma_envs:FACTORY)."""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv


class Rounds(ParallelEnv):
    """Episodes of `length` rounds: each round every agent acts on what `_draw` showed it, then the env draws the
    next; the episode is truncated after the last round."""

    rng: np.random.Generator
    length: int

    def _draw(self) -> dict[str, Any]:
        raise NotImplementedError

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.agents, self.t = list(self.possible_agents), 0
        return self._draw(), {a: {} for a in self.agents}

    def _round(self, rewards: dict[str, float]) -> tuple[dict, dict, dict, dict, dict]:
        self.t += 1
        obs = self._draw()
        done = self.t >= self.length
        agents = self.agents
        if done:
            self.agents = []
        return obs, rewards, {a: False for a in agents}, {a: done for a in agents}, {a: {} for a in agents}


class SignalGame(Rounds):
    """Each step every agent sees its own bit (one-hot) and is right when its action equals it; all share the team
    reward: the fraction of agents right plus `noise` x z, where z ~ N(0, 1) is drawn with the bits and shown only in
    the global state. An agent's own observation cannot predict z, so IPPO's critic leaves it in every advantage;
    MAPPO's critic reads it from state() and takes it out: the same actor learns from cleaner advantages."""

    metadata = {"name": "signal_game_v0", "is_parallelizable": True}

    def __init__(self, agents: int = 3, length: int = 8, noise: float = 2.0) -> None:
        self.possible_agents = [f"agent_{i}" for i in range(agents)]
        self.length, self.noise = length, noise
        self.state_space = spaces.Box(-np.inf, np.inf, (2 * agents + 1,), np.float32)
        self.rng = np.random.default_rng()

    def observation_space(self, agent: str) -> spaces.Space:
        return spaces.Box(0.0, 1.0, (2,), np.float32)

    def action_space(self, agent: str) -> spaces.Space:
        return spaces.Discrete(2)

    def _draw(self) -> dict[str, np.ndarray]:
        self.bits = self.rng.integers(0, 2, len(self.possible_agents))
        self.z = float(self.rng.standard_normal())
        return {a: np.eye(2, dtype=np.float32)[b] for a, b in zip(self.possible_agents, self.bits, strict=True)}

    def state(self) -> np.ndarray:
        return np.concatenate([np.eye(2, dtype=np.float32)[self.bits].reshape(-1), [self.z]]).astype(np.float32)

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        right = np.mean([int(actions[a]) == b for a, b in zip(self.possible_agents, self.bits, strict=True)])
        reward = float(right + self.noise * self.z)
        return self._round({a: reward for a in self.agents})


def signal_game(**kwargs: Any) -> SignalGame:
    return SignalGame(**kwargs)


class LeavesEarly(ParallelEnv):
    """Two agents with scripted rewards: "stays" gets 1 a step and is truncated after 4 steps, "leaves" gets 2 a step
    and terminates after its 2nd step, the copy going on without it. Observations count the steps (scaled)."""

    metadata = {"name": "leaves_early_v0", "is_parallelizable": True}
    possible_agents = ["stays", "leaves"]

    def observation_space(self, agent: str) -> spaces.Space:
        return spaces.Box(0.0, 10.0, (1,), np.float32)

    def action_space(self, agent: str) -> spaces.Space:
        return spaces.Discrete(2)

    def _obs(self) -> dict[str, np.ndarray]:
        return {a: np.array([self.t], np.float32) for a in self.agents}

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        self.agents, self.t = list(self.possible_agents), 0
        return self._obs(), {a: {} for a in self.agents}

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        self.t += 1
        acting = list(self.agents)
        rewards = {a: 1.0 if a == "stays" else 2.0 for a in acting}
        term = {a: a == "leaves" and self.t >= 2 for a in acting}
        trunc = {a: a == "stays" and self.t >= 4 for a in acting}
        self.agents = [a for a in acting if not (term[a] or trunc[a])]
        obs = {a: np.array([self.t], np.float32) for a in acting}  # the final observation of those that end
        return obs, rewards, term, trunc, {a: {} for a in acting}


def leaves_early() -> LeavesEarly:
    return LeavesEarly()


class Mixed(ParallelEnv):
    """Two agents whose observation spaces differ (for the share=true refusal)."""

    metadata = {"name": "mixed_v0"}
    possible_agents = ["small", "large"]

    def observation_space(self, agent: str) -> spaces.Space:
        return spaces.Box(0.0, 1.0, (2 if agent == "small" else 3,), np.float32)

    def action_space(self, agent: str) -> spaces.Space:
        return spaces.Discrete(2)

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        self.agents = list(self.possible_agents)
        return {a: np.zeros(self.observation_space(a).shape, np.float32) for a in self.agents}, {}

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        raise NotImplementedError


def mixed() -> Mixed:
    return Mixed()


class Roles(Rounds):
    """Two roles that see the same bit and must answer differently: "copier_N" is right when its action is the bit,
    "flipper_N" when it is the other one (each its own reward). One shared policy that cannot tell the agents apart
    is right half the time at best; a policy per group (network.share=false) can learn both roles. `wide` gives the
    flippers a wider observation (a zero beside the bit), so the groups' spaces differ."""

    metadata = {"name": "roles_v0"}

    def __init__(self, per_role: int = 1, wide: bool = False, length: int = 4, masked: bool = False) -> None:
        self.possible_agents = [f"{role}_{i}" for role in ("copier", "flipper") for i in range(per_role)]
        self.wide, self.length, self.masked = wide, length, masked  # masked: the copiers' obs carry a mask
        self.rng = np.random.default_rng()

    def observation_space(self, agent: str) -> spaces.Space:
        box = spaces.Box(0.0, 1.0, (3 if self.wide and agent.startswith("flipper") else 2,), np.float32)
        if self.masked and agent.startswith("copier"):
            return spaces.Dict({"obs": box, "action_mask": spaces.Box(0, 1, (2,), np.int8)})
        return box

    def action_space(self, agent: str) -> spaces.Space:
        return spaces.Discrete(2)

    def _draw(self) -> dict[str, Any]:
        self.bit = int(self.rng.integers(0, 2))
        out: dict[str, Any] = {}
        for a in self.possible_agents:
            space = self.observation_space(a)
            box = space["obs"] if isinstance(space, spaces.Dict) else space
            seen = np.zeros(box.shape, np.float32)
            seen[self.bit] = 1.0
            out[a] = {"obs": seen, "action_mask": np.ones(2, np.int8)} if isinstance(space, spaces.Dict) else seen
        return out

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        return self._round({a: float((int(actions[a]) == self.bit) == a.startswith("copier")) for a in self.agents})


def roles(**kwargs: Any) -> Roles:
    return Roles(**kwargs)
