"""Two small envs that show, and test, action masking and Dict observations (`env=MaskedGrid-v0`,
`env=GoalReach-v0`; docs/custom-env.md). Importing this module registers them with gymnasium as
`ppo_cli.example_envs:MaskedGrid-v0` and `ppo_cli.example_envs:GoalReach-v0`.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

# The grid of MaskedGrid: S start, G goal, # wall. The shortest path takes 20 moves (best return 0.81).
GRID = ("S..#....",
        "##.#.##.",
        "...#..#.",
        ".####.#.",
        "......#.",
        "#.#####.",
        "..#...#.",
        "#...#..G")
MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))  # up, down, left, right


class MaskedGrid(gym.Env):
    """Walk from S to G in an 8x8 maze: +1 at the goal, -0.01 a step, 100 steps at most.

    Observation: the cell index (Discrete(64)). Actions: up, down, left, right (Discrete(4)). A move into a wall
    or off the grid is invalid: with `masked=True` (default) the env says so, both as `info["action_mask"]` and
    through `action_masks()` (sb3-contrib's convention), and an invalid move is refused with an error; with
    `masked=False` it gives no masks and an invalid move leaves the agent where it is, a wasted step.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, masked: bool = True) -> None:
        self.masked = masked
        self.rows, self.cols = len(GRID), len(GRID[0])
        self.observation_space = gym.spaces.Discrete(self.rows * self.cols)
        self.action_space = gym.spaces.Discrete(len(MOVES))
        self.start = next((r, c) for r, line in enumerate(GRID) for c, ch in enumerate(line) if ch == "S")
        self.goal = next((r, c) for r, line in enumerate(GRID) for c, ch in enumerate(line) if ch == "G")
        self.pos = self.start

    def _target(self, action: int) -> tuple[int, int] | None:
        r, c = self.pos[0] + MOVES[action][0], self.pos[1] + MOVES[action][1]
        if 0 <= r < self.rows and 0 <= c < self.cols and GRID[r][c] != "#":
            return r, c
        return None

    def action_masks(self) -> np.ndarray:
        return np.array([self._target(a) is not None for a in range(len(MOVES))])

    def _info(self) -> dict[str, Any]:
        return {"action_mask": self.action_masks()} if self.masked else {}

    def _obs(self) -> int:
        return self.pos[0] * self.cols + self.pos[1]

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[int, dict[str, Any]]:
        super().reset(seed=seed)
        self.pos = self.start
        return self._obs(), self._info()

    def step(self, action: int) -> tuple[int, float, bool, bool, dict[str, Any]]:
        target = self._target(int(action))
        if target is None and self.masked:
            raise ValueError(f"MaskedGrid: action {int(action)} is masked at {self.pos}")
        self.pos = target or self.pos
        reached = self.pos == self.goal
        return self._obs(), 1.0 if reached else -0.01, reached, False, self._info()


class GoalReach(gym.Env):
    """Move a point to a goal drawn anew each episode: a goal-conditioned task with a Dict observation
    {"desired_goal": goal (x, y), "observation": position (x, y)}, both in [-1, 1]^2.

    Actions: up, down, left, right by 0.2 (Discrete(4)). Reward -0.05 a step and +1 on reaching within 0.15 of
    the goal, which ends the episode; 40 steps at most. Without the goal in its observation a policy cannot
    know where to go, so learning it is learning to read both keys. gymnasium's FlattenObservation wrapper turns
    it into the same task with the keys concatenated by hand (desired_goal first, as Dict's sorted keys are).
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self) -> None:
        box = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.observation_space = gym.spaces.Dict({"desired_goal": box, "observation": box})
        self.action_space = gym.spaces.Discrete(len(MOVES))
        self.pos = np.zeros(2, np.float32)
        self.goal = np.zeros(2, np.float32)

    def _obs(self) -> dict[str, np.ndarray]:
        return {"desired_goal": self.goal.copy(), "observation": self.pos.copy()}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict[str, Any]]:
        super().reset(seed=seed)
        self.pos = self.np_random.uniform(-0.8, 0.8, 2).astype(np.float32)
        self.goal = self.np_random.uniform(-0.8, 0.8, 2).astype(np.float32)
        return self._obs(), {}

    def step(self, action: int) -> tuple[dict, float, bool, bool, dict[str, Any]]:
        dr, dc = MOVES[int(action)]
        self.pos = np.clip(self.pos + 0.2 * np.array([dc, -dr], np.float32), -1.0, 1.0).astype(np.float32)
        reached = bool(np.linalg.norm(self.pos - self.goal) < 0.15)
        return self._obs(), 1.0 if reached else -0.05, reached, False, {}


gym.register("MaskedGrid-v0", entry_point=MaskedGrid, max_episode_steps=100)
gym.register("GoalReach-v0", entry_point=GoalReach, max_episode_steps=40)
