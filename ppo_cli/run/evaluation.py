"""Scoring a policy: N whole episodes in a vector env. Used by ppo-eval and during and after training (one
code path); `PeriodicEvaluator` is the training run's side of it (when, best.pt, stop-at-return).

Each sub-env is given a fixed quota of episodes up front. Taking "the first N episodes to finish" instead
would favour short episodes, since envs that fail fast report first.

Evaluation envs carry a step cap (`StepCap`, `eval.max_episode_steps` / `ppo-eval --max-episode-steps`): an env
without a time limit and a policy that never finishes would otherwise play one episode forever. A cut episode
counts, with its partial return, and the result says how many were cut.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from omegaconf import DictConfig

from ppo_cli.envs.agents import agent_means
from ppo_cli.envs.faults import close_at_once
from ppo_cli.envs.make import make_vec_env
from ppo_cli.envs.masks import ActionMasks
from ppo_cli.envs.spaces import describe_space
from ppo_cli.envs.step_cap import CUT_KEY
from ppo_cli.policy.actor_critic import ActorCritic
from ppo_cli.policy.observations import as_tensors
from ppo_cli.run.trial import TrialReporter


@dataclass
class EvalResult:
    returns: list[float]
    lengths: list[int]
    cut: int = 0  # episodes that StepCap cut: their returns are partial
    # Per episode, the env it was played in and whether it was cut (run_episodes fills them; `part` reads them).
    played_in: list[int] = field(default_factory=list, repr=False)
    was_cut: list[bool] = field(default_factory=list, repr=False)
    # A PettingZoo env's (envs/agents.py): `returns` are team returns, and these each episode's agents' own.
    agent_returns: list[list[float]] = field(default_factory=list, repr=False)
    agent_names: list[str] = field(default_factory=list, repr=False)

    def part(self, first: int, count: int) -> EvalResult:
        """The episodes played in envs first to first + count - 1 (a batch's member's share: run/batched.py)."""
        mine = [i for i, env in enumerate(self.played_in) if first <= env < first + count]
        cuts = [self.was_cut[i] for i in mine]
        return EvalResult([self.returns[i] for i in mine], [self.lengths[i] for i in mine], sum(cuts),
                          [self.played_in[i] - first for i in mine], cuts)

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std_return(self) -> float:
        return float(np.std(self.returns))

    @property
    def mean_length(self) -> float:
        return float(np.mean(self.lengths))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mean_return": self.mean_return, "std_return": self.std_return,
                               "min_return": float(np.min(self.returns)), "max_return": float(np.max(self.returns)),
                               "mean_length": self.mean_length, "episodes": len(self.returns), "cut_episodes": self.cut}
        if self.agent_returns:
            out["agent_returns"], out["agent_return_mean"] = agent_means(self.agent_returns, self.agent_names)
        return out


def run_episodes(envs: gym.vector.VectorEnv, act: Callable[[Any, np.ndarray | None, np.ndarray], np.ndarray],
                 episodes: int, seed: int | list[int], label: str = "evaluation env",
                 on_episode: Callable[[float, int], None] | None = None, blocks: int = 1) -> EvalResult:
    """Play `episodes` episodes with `act(obs batch, action masks or None, episode starts) -> action batch`;
    envs must record episode statistics (and carry a `StepCap`, or episodes that never end hang this). Where the
    env gives action masks (masks.py), `act` gets them; the starts (true where an env's episode begins at this
    observation) let a recurrent policy reset its state. `on_episode(return, length)` hears of each episode
    counted, as it ends (ppo-eval's progress). `blocks`: the envs are that many runs' evaluation envs side by side
    (a batch's members, each with its own seeds in `seed`), each block playing `episodes` as one run would."""
    # A PettingZoo env's rows are its copies' agents: a copy plays whole team episodes, counted on its first row.
    rows_of_agents = hasattr(envs.unwrapped, "agents_per_copy")  # as rollout.collect tells them
    agents = envs.unwrapped.agents_per_copy if rows_of_agents else 1
    key = "team" if rows_of_agents else "episode"
    n = envs.num_envs // blocks // agents
    quota = np.zeros(envs.num_envs, dtype=int)
    quota[::agents] = np.tile([(episodes + i) // n for i in range(n)], blocks)
    n = envs.num_envs
    done = np.zeros(n, dtype=int)
    result = EvalResult([], [], agent_names=list(getattr(envs.unwrapped, "agent_names", [])))
    none = np.zeros(n, dtype=bool)
    obs, info = envs.reset(seed=seed)
    masks = ActionMasks.detect(envs, describe_space(envs.single_observation_space),
                               describe_space(envs.single_action_space), info, label)
    mask = None if masks is None else masks(obs, info, envs, 0)
    starts = np.ones(n, dtype=bool)
    steps = 0
    while (done < quota).any():
        obs, _, terminated, truncated, info = envs.step(act(obs, mask, starts))
        starts = terminated | truncated
        steps += n
        if masks is not None:
            mask = masks(obs, info, envs, steps)
        final = info.get("final_info") or {}  # SAME_STEP: the info of the step that ended an episode
        cuts = np.asarray(final.get("_" + CUT_KEY, none), dtype=bool)
        for i in np.flatnonzero(cuts | np.asarray(info.get("_" + key, none), dtype=bool)):
            if done[i] < quota[i]:
                stats = final[CUT_KEY] if cuts[i] else info[key]
                if rows_of_agents:
                    result.agent_returns.append(stats["a"][i].tolist())
                result.returns.append(float(stats["r"][i]))
                result.lengths.append(int(stats["l"][i]))
                result.played_in.append(int(i))
                result.was_cut.append(bool(cuts[i]))
                done[i] += 1
                result.cut += int(cuts[i])
                if on_episode is not None:
                    on_episode(result.returns[-1], result.lengths[-1])
    return result


def evaluate(policy: ActorCritic, envs: gym.vector.VectorEnv, episodes: int, seed: int,
             deterministic: bool = True, device: torch.device | str = "cpu",
             on_episode: Callable[[float, int], None] | None = None) -> EvalResult:
    """Deterministic (the most likely allowed action; a Gaussian's mean) by default; stochastic samples from a
    generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    state = policy.initial_state(envs.num_envs, device)

    def act(obs: Any, mask: np.ndarray | None, starts: np.ndarray) -> np.ndarray:
        nonlocal state
        if state is not None:  # each env's episode starts from a fresh state
            state[torch.as_tensor(starts, device=device)] = 0.0
        x = policy.prepare(as_tensors(obs, device))
        m = None if mask is None else torch.as_tensor(mask, device=device)
        action, _, _, state = policy.act_step(x, state, rng, deterministic, m)
        return policy.env_action(action)

    return run_episodes(envs, act, episodes, seed, on_episode=on_episode)


def evaluate_random(envs: gym.vector.VectorEnv, episodes: int, seed: int) -> EvalResult:
    """The uniformly random policy on the same seeds (among the allowed actions, where the env gives masks): the
    floor a trained policy is compared against."""
    envs.action_space.seed(seed)
    rng = np.random.default_rng(seed)
    space = envs.single_action_space

    def act(_obs: Any, mask: np.ndarray | None, _starts: np.ndarray) -> np.ndarray:
        if mask is None:
            return envs.action_space.sample()
        nvec = [int(space.n)] if isinstance(space, gym.spaces.Discrete) else [int(k) for k in space.nvec.flatten()]
        # Uniform among the allowed: the largest of uniform draws where allowed, per component.
        scores = np.where(mask, rng.random(mask.shape), -1.0)
        picks = np.stack([part.argmax(axis=1) for part in np.split(scores, np.cumsum(nvec)[:-1], axis=1)], axis=1)
        if isinstance(space, gym.spaces.Discrete):
            return picks[:, 0] + int(space.start)
        return (picks + space.start.flatten()).reshape(len(mask), *space.shape)

    return run_episodes(envs, act, episodes, seed)


def cut_note(cut: int, episodes: int, max_steps: int, setting: str) -> str:
    """What the step cap did, naming the setting that sets it."""
    return (f"{cut} of {episodes} episodes reached the step cap of {max_steps:,} steps and were cut (their returns "
            f"are partial; {setting} sets the cap)")


EVAL_SEED_OFFSET = 10_000  # evaluation envs get their own seeds, far from the training envs' seed + i


class PeriodicEvaluator:
    """Evaluation during a training run: every `eval.every_steps` steps and at the end, on envs of its own
    (seeds seed + EVAL_SEED_OFFSET, ...), keeping the best result (the runner writes best.pt)."""

    def __init__(self, cfg: DictConfig, policy: ActorCritic, device: torch.device,
                 message: Callable[[str], None]) -> None:
        self.cfg, self.policy, self.device, self.message = cfg, policy, device, message
        self.envs: gym.vector.VectorEnv | None = None
        self.best: dict[str, Any] | None = None  # summary of the best evaluation, with its global_step
        self.seconds = 0.0
        self.last: tuple[int, EvalResult] | None = None
        self.trial: TrialReporter | None = None  # a tuning sweep's job: its trial, opened at the first report
        self.pruned = False

    def due(self, step_before: int, step: int) -> bool:
        every = self.cfg.eval.every_steps
        return bool(every) and step // every > step_before // every

    def evaluate(self, step: int) -> EvalResult:
        """Score the current policy on the evaluation envs: the same function ppo-eval uses."""
        ev = self.cfg.eval
        if self.last is not None and self.last[0] == step:
            return self.last[1]
        t0 = time.perf_counter()
        seed = self.cfg.seed + EVAL_SEED_OFFSET
        if self.envs is None:
            self.envs = make_vec_env(self.cfg.env, seed=seed, num_envs=min(ev.episodes, self.cfg.env.num_envs),
                                     step_cap=ev.max_episode_steps)
        result = evaluate(self.policy, self.envs, ev.episodes, seed=seed, deterministic=ev.deterministic,
                          device=self.device)
        self.take(step, result, time.perf_counter() - t0)
        return result

    def take(self, step: int, result: EvalResult, seconds: float) -> None:
        """The evaluation at `step` is `result`, which took `seconds` (evaluate's, or a batch's: run/batched.py)."""
        ev = self.cfg.eval
        self.seconds += seconds
        self.last = (step, result)
        if result.cut:  # said for every evaluation, periodic and final, as their returns are partial
            self.message(f"eval @ {step:,}: "
                         f"{cut_note(result.cut, len(result.returns), ev.max_episode_steps, 'eval.max_episode_steps')}")

    def periodic(self, step: int) -> tuple[EvalResult, bool]:
        """Evaluate; (the result, whether it is the best so far: the runner then saves best.pt and `report`s)."""
        result = self.evaluate(step)
        improved = self.best is None or result.mean_return > self.best["mean_return"]
        if improved:
            self.best = {**result.summary(), "global_step": step}
        return result, improved

    def report(self, step: int, result: EvalResult, saved: bool) -> dict[str, float]:
        """Say how a periodic evaluation went; its TensorBoard scalars."""
        self.message(f"eval @ {step:,}: mean return {result.mean_return:.2f} +/- {result.std_return:.2f} "
                     f"over {len(result.returns)} episodes (best {self.best['mean_return']:.2f}"  # type: ignore[index]
                     f"{', saved best.pt' if saved else ''})")
        return {"eval/mean_return": result.mean_return, "eval/std_return": result.std_return,
                "eval/mean_length": result.mean_length, "eval/cut_episodes": result.cut,
                "charts/eval_seconds": self.seconds}

    def stop_reason(self, step: int, result: EvalResult) -> str | None:
        """Why training stops after this periodic evaluation, or None: eval.stop_at_return reached, or (a tuning
        sweep's job) the study's pruner pruned the trial, which it is told of here."""
        target = self.cfg.eval.stop_at_return
        if target is not None and result.mean_return >= target:
            return f"evaluated mean return {result.mean_return:.2f} >= {target}"
        tune = self.cfg.get("tune")
        if tune is None or tune.storage is None:
            return None
        if self.trial is None:
            self.trial = TrialReporter.from_cfg(self.cfg)
        nominal = step // self.cfg.eval.every_steps * self.cfg.eval.every_steps
        if self.trial is not None and self.trial.report(nominal, result.mean_return):
            self.pruned = True
            return (f"the study's {self.trial.pruner.__class__.__name__} pruned trial {tune.trial} (evaluated mean "
                    f"return {result.mean_return:.2f})")
        return None

    def abandon(self) -> None:
        """Discard the envs of an evaluation a signal cut short. They may be inside a call: an async vector env's
        pipes then hold replies half read, and a graceful close would read them as answers to its own "close" and
        shut the pipes while a worker still writes (a BrokenPipeError traceback from the worker). So the workers
        are killed and the envs closed without a word to them; the next evaluation builds new ones."""
        if self.envs is None:
            return
        close_at_once(self.envs)
        self.envs = None

    def close(self) -> None:
        if self.envs is not None:
            self.envs.close()
