"""Two-player turn-based PettingZoo games (AEC: classic's tictactoe, connect_four) as a one-agent gymnasium env
(algo=selfplay).

`TwoPlayerEnv` is the game from one player's seat, the learner's: it takes the learner's move, then plays the
opponent's moves until the learner's turn comes back or the game ends, and returns the learner's observation (with
its action_mask) and the reward the learner got in between. The learner takes both seats, the first in the even
episodes of each env and the second in the odd ones, so it learns to open and to answer.

Opponents come from an `OpponentPool` the envs of a run share: the uniformly random player (among the legal moves),
and whatever players the trainer adds (its past policies: algo/ppo.py adds one each update, keeping
algo.selfplay_pool). Each episode draws its opponent from the pool with the env's own random stream. A player is
any callable (observation, action mask, rng) -> action, so this module needs nothing of the policy.

Each episode's outcome from the learner's seat is kept in `outcomes` (seat, return), which ppo-eval reads for its
win / draw / loss rates per seat.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from ppo_cli.envs.spaces import MASK_KEY
from ppo_cli.errors import UserError

Player = Callable[[Any, np.ndarray, np.random.Generator], int]


def random_player(_obs: Any, mask: np.ndarray, rng: np.random.Generator) -> int:
    """A uniformly random legal move."""
    return int(rng.choice(np.flatnonzero(mask)))


class OpponentPool:
    """The opponents a run's envs draw from: the random player, then up to `size` added players (oldest dropped)."""

    def __init__(self, size: int, keep_random: bool = True) -> None:
        self.size, self.players = size, []
        self.fixed: list[Player] = [random_player] if keep_random else []

    def add(self, player: Player) -> None:
        self.players = [*self.players, player][-self.size:]

    def draw(self, rng: np.random.Generator) -> Player:
        choices = self.fixed + self.players
        return choices[int(rng.integers(len(choices)))]


class TwoPlayerEnv(gym.Env):
    """One seat of a two-player AEC game, the other played by the pool's opponents (see the module doc)."""

    def __init__(self, make: Callable[[], Any], pool: OpponentPool, label: str) -> None:
        try:
            self.game = make()
        except Exception as exc:  # noqa: BLE001 - constructing a (third-party) env can fail in any way
            raise UserError(f"{label!r}: the game could not be created ({type(exc).__name__}: {exc}); check "
                            f"env.kwargs") from None
        self.pool, self.label = pool, label
        names = list(getattr(self.game, "possible_agents", None) or [])
        if len(names) != 2:
            raise UserError(f"algo=selfplay plays two-player games; {label!r} has {len(names)} agents ({names})")
        self.names = names
        space = self.game.observation_space(names[0])
        if not isinstance(space, gym.spaces.Dict) or MASK_KEY not in space.spaces:
            raise UserError(f"algo=selfplay reads each move's legal actions from the observation's {MASK_KEY!r} "
                            f"(PettingZoo classic's convention); {label!r} observes {space}")
        for name in names[1:]:
            if self.game.observation_space(name) != space or self.game.action_space(name) != self.game.action_space(
                    names[0]):
                raise UserError(f"algo=selfplay: the two players' spaces differ ({names[0]}: {space}, {name}: "
                                f"{self.game.observation_space(name)}); one policy plays both seats")
        self.observation_space, self.action_space = space, self.game.action_space(names[0])
        self.metadata = dict(getattr(self.game, "metadata", {}))
        self.render_mode = getattr(self.game, "render_mode", None)
        self.episodes = 0
        self.seat = 0
        self.opponent: Player = random_player
        self.outcomes: list[tuple[int, float]] = []

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        if seed is not None:  # a seeded reset starts the count over: seats alternate from the first seat
            self.episodes, self.outcomes = 0, []
        self.game.reset(seed=None if seed is None else int(self.np_random.integers(2**31)))
        self.seat = self.episodes % 2
        self.episodes += 1
        self.opponent = self.pool.draw(self.np_random)
        if self._opponents_move():  # a game the opponent ends before the learner moves: nothing to learn
            raise UserError(f"{self.label!r}: the game ended before the second player's first move")
        return self.game.observe(self._me()), {"seat": self.seat}

    def _me(self) -> str:
        return self.names[self.seat]

    def _over(self) -> bool:
        me = self._me()
        return bool(self.game.terminations.get(me, True) or self.game.truncations.get(me, False))

    def _opponents_move(self) -> bool:
        """The opponent's moves until the learner's turn comes back; whether the game is over."""
        game, me = self.game, self._me()
        while not self._over() and game.agent_selection != me:
            obs = game.observe(game.agent_selection)
            game.step(self.opponent(obs, np.asarray(obs[MASK_KEY]), self.np_random))
        return self._over()

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        game, me = self.game, self._me()
        game.step(int(action))
        over = self._over() or self._opponents_move()
        # What the learner earned since its move: its move's reward and the opponent's replies' (AEC accumulates
        # an agent's rewards until it acts again).
        reward = float(game._cumulative_rewards.get(me, 0.0))
        if not over:
            return game.observe(me), reward, False, False, {"seat": self.seat}
        terminated = bool(game.terminations.get(me, True))
        self.outcomes.append((self.seat, reward))
        return game.observe(me), reward, terminated, not terminated, {"seat": self.seat}

    def render(self) -> Any:
        return self.game.render()

    def close(self) -> None:
        self.game.close()
