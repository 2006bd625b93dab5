"""Atari (`env.atari=true`, docs/pixels.md): the standard preprocessing pipeline around an ALE env, and game scores.

The pipeline, from the ALE env out (gymnasium's wrappers where it has them):

    ALE/<Game>-v5 (frameskip=1, sticky actions 0.25 unless env.kwargs says otherwise, minimal action set)
    -> AtariPreprocessing: up to 30 no-ops at reset, frame skip 4 with max-pooling of the last two frames,
       84x84 grayscale (uint8)
    -> GameScore: the raw score and length (agent steps) of the whole game, put in `info["game"]` when it ends
    -> training only: EpisodicLife (a lost life ends PPO's episode; the game goes on), FireOnReset (FIRE after
       every reset, for games that need it), rewards clipped to their sign
       evaluation: FireOnReset(each_life=True) (FIRE at the start of every life, which training's fire-on-reset
       taught the policy to expect), no life splitting, raw rewards
    -> FrameStackObservation: the last 4 frames, uint8 [4, 84, 84]

GameStatistics takes the place of gymnasium's RecordEpisodeStatistics on the vector env: it reports a finished
*game* (all lives, unclipped score) as `info["episode"]`, in RecordEpisodeStatistics's format, so the rollout's
returns, TensorBoard, periodic evaluation, best.pt and ppo-eval all see game scores and never the clipped
per-life rewards PPO trains on.
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import EnvSpec

from ppo_cli.errors import UserError, extra_hint

GAMES = ("Pong", "Breakout", "BeamRider", "SpaceInvaders", "Seaquest", "Qbert", "Enduro")  # the conf/env presets
NOOP_MAX = 30
FRAME_SKIP = 4
SCREEN_SIZE = 84
FRAME_STACK = 4
# The ALE's own settings, unless env.kwargs sets them: sticky actions as the v5 ids have them (Machado et al.
# 2018; CleanRL and SB3's NoFrameskip-v4 figures use 0.0: env.kwargs.repeat_action_probability=0.0), and the
# minimal action set.
ALE_DEFAULTS = {"repeat_action_probability": 0.25, "full_action_space": False}


def register() -> None:
    """Import ale-py (which registers the ALE/ ids and ships the ROMs) and OpenCV (AtariPreprocessing's resize),
    or say which extra installs them."""
    missing = []
    try:
        import ale_py
    except ImportError:
        missing.append("ale-py")
    else:
        gym.register_envs(ale_py)
    try:
        import cv2  # noqa: F401
    except ImportError:
        missing.append("opencv-python-headless")
    if missing:
        raise UserError(f"Atari games need {' and '.join(missing)}: {extra_hint('atari')}")


def env_kwargs(kwargs: dict[str, Any], label: str) -> dict[str, Any]:
    """The ALE env's keyword arguments under the pipeline: frameskip 1 (AtariPreprocessing skips frames), and
    ALE_DEFAULTS where env.kwargs does not set them."""
    if kwargs.get("frameskip", 1) != 1:
        raise UserError(f"{label!r}: env.atari=true skips {FRAME_SKIP} frames itself; leave out "
                        f"env.kwargs.frameskip={kwargs['frameskip']}")
    return {**ALE_DEFAULTS, **kwargs, "frameskip": 1}


def check_spec(spec: EnvSpec, label: str) -> None:
    entry = spec.entry_point if isinstance(spec.entry_point, str) else getattr(spec.entry_point, "__module__", "")
    if not str(entry).startswith("ale_py"):
        raise UserError(f"env.atari=true: {label!r} is not an Atari game (an ALE id such as ALE/Breakout-v5)")


def wrap(env: gym.Env, training: bool) -> gym.Env:
    """The pipeline (module doc) around an ALE env made with env_kwargs."""
    env = gym.wrappers.AtariPreprocessing(env, noop_max=NOOP_MAX, frame_skip=FRAME_SKIP, screen_size=SCREEN_SIZE,
                                          terminal_on_life_loss=False, grayscale_obs=True, scale_obs=False)
    return game_wrappers(env, training)


def game_wrappers(env: gym.Env, training: bool) -> gym.Env:
    """The pipeline after the frame preprocessing: game scores, lives, FIRE, reward clipping, the frame stack."""
    env = GameScore(env)
    fire = needs_fire(env)
    if training:
        env = EpisodicLife(env)
        if fire:
            env = FireOnReset(env)
        env = ClipRewardSign(env)
    elif fire:
        env = FireOnReset(env, each_life=True)
    return gym.wrappers.FrameStackObservation(env, FRAME_STACK)


def needs_fire(env: gym.Env) -> bool:
    """Games whose action 1 is FIRE wait for it before play starts (Breakout's ball, BeamRider's first wave)."""
    meanings = env.unwrapped.get_action_meanings()  # type: ignore[attr-defined]
    return len(meanings) >= 3 and meanings[1] == "FIRE"


def _lives(env: gym.Env) -> int:
    return int(env.unwrapped.ale.lives())  # type: ignore[attr-defined]


class GameScore(gym.Wrapper):
    """Counts the raw reward and the agent steps of the whole game (below any life splitting and reward clipping)
    and puts `{"r": score, "l": length}` in the info of the step that ends it."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.score, self.length = 0.0, 0

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self.score, self.length = 0.0, 0
        return self.env.reset(**kwargs)

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.score += float(reward)
        self.length += 1
        if terminated or truncated:
            info = {**info, "game": {"r": self.score, "l": self.length}}
            self.score, self.length = 0.0, 0
        return obs, reward, terminated, truncated, info


class EpisodicLife(gym.Wrapper):
    """A lost life ends the episode (terminated) for PPO, but not the game: the next reset only steps on (a no-op)
    unless the game is over (as SB3's and CleanRL's EpisodicLifeEnv) or the reset is given a seed."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.lives, self.game_over = 0, True

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.game_over = terminated or truncated
        lives = _lives(self)
        if 0 < lives < self.lives:
            terminated = True
        self.lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        # A seeded reset (a run's start, a resume that restarts its episodes) starts a new game from that seed;
        # only the vector env's reset after a lost life, which passes none, lets the game go on.
        if self.game_over or kwargs.get("seed") is not None:
            obs, info = self.env.reset(**kwargs)
        else:
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:  # the game ended on that no-op: its score goes out with the reset
                game = info.get("game")
                obs, info = self.env.reset(**kwargs)
                if game is not None:
                    info = {**info, "game": game}
        self.game_over = False
        self.lives = _lives(self)
        return obs, info


class FireOnReset(gym.Wrapper):
    """Press FIRE (then action 2) after a reset, as SB3's FireResetEnv; with `each_life`, also press FIRE once
    whenever a life is lost (evaluation plays whole games, and the policy learnt with a FIRE at each life's start)."""

    def __init__(self, env: gym.Env, each_life: bool = False) -> None:
        super().__init__(env)
        self.each_life, self.lives = each_life, 0

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        for action in (1, 2):
            obs, _, terminated, truncated, step_info = self.env.step(action)
            if terminated or truncated:  # rare: a game ended by this FIRE goes out with the reset
                obs, info = self.env.reset(**kwargs)
                if "game" in step_info:
                    info = {**info, "game": step_info["game"]}
        self.lives = _lives(self)
        return obs, info

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        lives = _lives(self)
        if self.each_life and not (terminated or truncated) and 0 < lives < self.lives:
            obs, extra, terminated, truncated, info = self.env.step(1)
            reward = float(reward) + float(extra)
        self.lives = lives
        return obs, reward, terminated, truncated, info


class ClipRewardSign(gym.RewardWrapper):
    """Training rewards clipped to their sign: -1, 0 or +1 (the scores' scales differ by orders between games)."""

    def reward(self, reward: Any) -> float:
        return float(np.sign(reward))


class GameStatistics(gym.vector.VectorWrapper):
    """RecordEpisodeStatistics for Atari: `info["episode"]` (`r`, `l`, `t`, with the `_episode` mask) holds the
    games that ended at this step, read from the GameScore of each sub-env (module doc)."""

    def __init__(self, env: gym.vector.VectorEnv) -> None:
        super().__init__(env)
        self.game_start = np.full(self.num_envs, time.perf_counter())

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self.game_start[:] = time.perf_counter()
        return self.env.reset(**kwargs)

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        obs, rewards, terminated, truncated, info = self.env.step(actions)
        ended = np.zeros(self.num_envs, dtype=bool)
        score, length = np.zeros(self.num_envs), np.zeros(self.num_envs, dtype=np.int64)
        # A game ends on a step that ends the episode too (its info is then the vector env's final_info), or, rarely,
        # inside the reset that follows a lost life (the reset's info is the top level).
        for source in (info.get("final_info") or {}, info):
            if "_game" in source:
                mask = np.asarray(source["_game"], dtype=bool)
                score[mask] = source["game"]["r"][mask]
                length[mask] = source["game"]["l"][mask]
                ended |= mask
        if ended.any():
            now = time.perf_counter()
            info = {**info, "episode": {"r": score, "l": length, "t": np.where(ended, now - self.game_start, 0.0)},
                    "_episode": ended}
            self.game_start[ended] = now
        return obs, rewards, terminated, truncated, info
