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




class Reach(gym.Env):
    """Continuous control: move a point on [-1, 1] to a target and hold it there (20-step time limit).

    obs = [position, target]; action in [-1, 1] moves the point by 0.25 * action; reward = -|position - target|.
    A random policy scores about -11 per episode, a good one about -2.
    """

    def __init__(self):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def _obs(self):
        return np.array([self.pos, self.target], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.target = self.np_random.uniform(-1.0, 1.0, size=2)
        return self._obs(), {}

    def step(self, action):
        assert self.action_space.contains(np.asarray(action, dtype=np.float32)), action  # the policy must clip
        self.pos = float(np.clip(self.pos + 0.25 * float(action[0]), -1.0, 1.0))
        return self._obs(), -abs(self.pos - self.target), False, False, {}


class MatchBits(gym.Env):
    """One-step episodes: copy the observed bits (MultiBinary actions); reward = number of matching bits."""

    def __init__(self, n: int = 3):
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(n,), dtype=np.float32)
        self.action_space = gym.spaces.MultiBinary(n)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.bits = self.np_random.integers(0, 2, size=self.observation_space.shape[0])
        return self.bits.astype(np.float32), {}

    def step(self, action):
        assert self.action_space.contains(action), action
        return self.bits.astype(np.float32), float((action == self.bits).sum()), True, False, {}


class MatchDigits(gym.Env):
    """One-step episodes: repeat the observed digits (MultiDiscrete actions, starting at 1); reward = matches."""

    def __init__(self):
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.MultiDiscrete([3, 4], start=[1, 1])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.digits = np.array([self.np_random.integers(1, 4), self.np_random.integers(1, 5)])
        return (self.digits / 4.0).astype(np.float32), {}

    def step(self, action):
        assert self.action_space.contains(np.asarray(action, dtype=np.int64)), action
        return (self.digits / 4.0).astype(np.float32), float((action == self.digits).sum()), True, False, {}


class DictActions(Corridor):
    """Actions in a Dict space, which ppo-cli does not support."""

    def __init__(self):
        super().__init__()
        self.action_space = gym.spaces.Dict({"move": gym.spaces.Discrete(2)})


gym.register("Corridor-v0", entry_point="tests.custom_env:Corridor", max_episode_steps=40)
gym.register("Reach-v0", entry_point="tests.custom_env:Reach", max_episode_steps=20)


class NoDisplay(Corridor):
    """Claims rgb_array rendering but fails to render, like MuJoCo without an OpenGL context."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(self, render_mode=None):
        super().__init__()
        self.render_mode = render_mode

    def render(self):
        raise RuntimeError("no OpenGL context on this machine")


class BadMask(Corridor):
    """Gives info['action_mask'] that is wrong in the way `kind` says, from step `after` on."""

    def __init__(self, kind: str = "shape", after: int = 3):
        super().__init__()
        self.kind, self.after, self.t = kind, after, 0

    def _mask(self):
        if self.t < self.after:
            return np.array([True, True])
        return {"shape": np.array([True, True, True]), "dtype": np.array([0.5, 1.0]),
                "empty": np.array([False, False])}[self.kind]

    def reset(self, *, seed=None, options=None):
        obs, _ = super().reset(seed=seed)
        self.t = 0
        return obs, {"action_mask": self._mask()}

    def step(self, action):
        self.t += 1
        obs, reward, terminated, truncated, _ = super().step(action)
        return obs, reward, terminated, truncated, {"action_mask": self._mask()}


class MaskedDigits(gym.Env):
    """MultiDiscrete actions whose masks (a Dict observation key) allow one value per component: the value
    shown in `observation`; choosing it pays 1 per component. One step per episode."""

    def __init__(self):
        self.nvec = np.array([3, 4])
        self.observation_space = gym.spaces.Dict({
            "action_mask": gym.spaces.MultiBinary(int(self.nvec.sum())),
            "observation": gym.spaces.Box(0.0, 1.0, (2,), np.float32)})
        self.action_space = gym.spaces.MultiDiscrete(self.nvec)
        self.digits = np.zeros(2, dtype=np.int64)

    def _obs(self):
        mask = np.zeros(int(self.nvec.sum()), dtype=np.int8)
        mask[self.digits[0]] = mask[3 + self.digits[1]] = 1
        return {"action_mask": mask, "observation": (self.digits / 4.0).astype(np.float32)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.digits = self.np_random.integers(0, self.nvec)
        return self._obs(), {}

    def step(self, action):
        if (action != self.digits).any():
            raise ValueError(f"MaskedDigits: masked action {action} taken")
        return self._obs(), 2.0, True, False, {}


class TextObs(Corridor):
    """A Dict observation with a Text key, which ppo-cli cannot encode."""

    def __init__(self):
        super().__init__()
        self.observation_space = gym.spaces.Dict({"pos": self.observation_space, "note": gym.spaces.Text(8)})


class MissionCorridor(Corridor):
    """A Dict observation as MiniGrid gives one: a position ppo-cli reads and a `mission` text it cannot."""

    def __init__(self):
        super().__init__()
        self.observation_space = gym.spaces.Dict({"pos": self.observation_space, "mission": gym.spaces.Text(16)})

    def _obs(self):
        return {"pos": super()._obs(), "mission": "walk right"}


class RepeatCue(gym.Env):
    """A memory task: a cue (0 or 1) is shown only at the first step; every step pays 1 for the action that
    equals it. `length` steps. A memoryless policy scores 1 + (length - 1) / 2 at best; one that remembers, length."""

    def __init__(self, length: int = 6):
        self.length = length
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(3,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.cue, self.t = 0, 0

    def _obs(self):
        obs = np.zeros(3, dtype=np.float32)
        if self.t == 0:
            obs[self.cue] = 1.0
        obs[2] = self.t / self.length
        return obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.cue, self.t = int(self.np_random.integers(2)), 0
        return self._obs(), {}

    def step(self, action):
        reward = float(int(action) == self.cue)
        self.t += 1
        return self._obs(), reward, self.t >= self.length, False, {}


class CrashOnRank1(Corridor):
    """Raises in step() after `after` steps when it runs in rank 1 of a distributed run."""

    def __init__(self, after: int = 40):
        super().__init__()
        self.after, self.t = after, 0

    def step(self, action):
        import os

        self.t += 1
        if os.environ.get("RANK") == "1" and self.t > self.after:
            raise RuntimeError("the simulator lost its connection")
        return super().step(action)


class SeedEcho(Corridor):
    """Observes the seed its first reset was given (None: -1), whatever happens after."""

    seed_seen = -1.0

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.seed_seen = float(seed)
        return super().reset(seed=seed, options=options)

    def _obs(self):
        return np.array([self.seed_seen], dtype=np.float32)


class StrictFloat64(gym.Env):
    """A float64 Box action space with a bound of 0.1 that checks every action against it, and a scalar (shape
    ()) Box observation."""

    def __init__(self):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(), dtype=np.float32)
        self.action_space = gym.spaces.Box(-0.1, 0.1, shape=(2,), dtype=np.float64)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.float32(0.5), {}

    def step(self, action):
        assert self.action_space.contains(action), f"{action!r} is outside {self.action_space}"
        self.t += 1
        return np.float32(0.5 - 0.01 * self.t), float(-np.abs(action).sum()), False, self.t >= 20, {}


class Faulty(Corridor):
    """Goes wrong as `fault` says from its `at`-th call of step() on (counted across episodes; for raise_reset, its
    `at`-th reset(), the first being 1): nan_obs, inf_obs, shape (an observation of shape (3,)), raise_step,
    raise_reset, nan_reward, inf_reward, huge_reward (1e30 at every step, whatever `at` says), nan_final (a NaN
    observation as the episode is truncated, which the vector env hands over in info["final_obs"])."""

    def __init__(self, fault: str = "nan_obs", at: int = 5):
        super().__init__()
        self.fault, self.at, self.steps, self.resets = fault, at, 0, 0

    def reset(self, *, seed=None, options=None):
        self.resets += 1
        if self.fault == "raise_reset" and self.resets >= self.at:
            raise RuntimeError("the simulator did not start")
        return super().reset(seed=seed, options=options)

    def step(self, action):
        self.steps += 1
        obs, reward, terminated, truncated, info = super().step(action)
        if self.fault == "huge_reward":
            reward = 1e30
        if self.steps < self.at:
            return obs, reward, terminated, truncated, info
        if self.fault == "raise_step":
            raise RuntimeError("the simulator lost its connection")
        if self.fault in ("nan_obs", "inf_obs"):
            obs = np.full_like(obs, np.nan if self.fault == "nan_obs" else -np.inf)
        elif self.fault == "nan_final":
            obs, truncated = np.full_like(obs, np.nan), True
        elif self.fault == "shape":
            obs = np.zeros(3, dtype=np.float32)
        elif self.fault in ("nan_reward", "inf_reward"):
            reward = np.nan if self.fault == "nan_reward" else np.inf
        return obs, reward, terminated, truncated, info


class NeverEnds(gym.Env):
    """No terminal state and no time limit: an episode goes on until something cuts it. Pays 1 per step. Its
    spaces are CartPole's (4 floats, 2 actions), so a policy trained on one can be scored on the other."""

    def __init__(self):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(4, dtype=np.float32), {}

    def step(self, action):
        return self.np_random.uniform(-1.0, 1.0, 4).astype(np.float32), 1.0, False, False, {}


class ScaledCartPole(gym.Wrapper):
    """CartPole-v1 with its rewards multiplied by `scale` (the training doctor's unscaled-reward case)."""

    def __init__(self, scale: float = 1e4):
        super().__init__(gym.make("CartPole-v1"))
        self.scale = scale

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward * self.scale, terminated, truncated, info
