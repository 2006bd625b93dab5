"""The rollout: one loop (`collect`) that acts in the envs through an actor (torch's, or the fast path's numpy twin)
and writes the rollout storage (storage.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch

from ppo_cli.algo.compiled import with_fallback
from ppo_cli.algo.fast.core import NumpyActor, covers
from ppo_cli.algo.storage import RolloutBuffer
from ppo_cli.algo.timing import Stopwatch
from ppo_cli.devices import HostStaging, stages
from ppo_cli.envs.agents import agent_means
from ppo_cli.envs.masks import ActionMasks
from ppo_cli.policy.actor_critic import ActorCritic
from ppo_cli.policy.normalize import RewardScaler
from ppo_cli.policy.observations import as_tensors, batch_size, stack


class Actor(Protocol):
    """What the rollout acts through: TorchActor, or fast.core.NumpyActor where it covers the policy."""

    def inputs(self, obs: np.ndarray, update_stats: bool = True, rows: np.ndarray | None = None) -> Any:
        """The network input for raw observations (what the buffer stores): of every env, or of envs `rows`;
        folds them into the observation statistics when `update_stats`."""

    def act(self, x: Any, mask: np.ndarray | None = None) -> tuple[Any, Any, Any]:
        """(sampled actions, their log-probs, values), only among the actions `mask` allows where it is given."""

    def value(self, x: Any, rows: np.ndarray | None = None) -> Any:
        """V of the inputs (from the recurrent state of envs `rows`, all envs where None)."""

    def env_action(self, action: Any) -> np.ndarray: ...

    # The recurrent state of every env (None without a core) and whether each was zeroed before this step.
    state: torch.Tensor | None
    starts: np.ndarray | None

    def end_episodes(self, ended: np.ndarray) -> None:
        """Zero the recurrent state of the envs whose episode just ended."""


class TorchActor:
    """The policy itself as the rollout's actor, on its device; it carries a recurrent policy's state.

    On a device other than the CPU (`staged`), each step's observations, noise and mask go over in queued copies
    from page-locked buffers and the actions come back in one copy the host waits for (devices.HostStaging):
    that wait, which the env needs, is the step's only one. `step` replaces the policy's sample_step (by its
    torch.compile'd form: choose_actor)."""

    def __init__(self, policy: ActorCritic, rng: np.random.Generator, device: torch.device, num_envs: int = 0,
                 staged: bool | None = None, step: Callable[..., Any] | None = None) -> None:
        self.policy, self.rng, self.device, self.num_envs = policy, rng, torch.device(device), num_envs
        self.state = policy.initial_state(num_envs, device)
        self.starts = None if self.state is None else np.ones(num_envs, dtype=bool)
        staged = stages(self.device) if staged is None else staged
        self.staging = HostStaging(self.device) if staged else None
        self._sample = step or policy.sample_step

    def inputs(self, obs: Any, update_stats: bool = True, rows: np.ndarray | None = None) -> torch.Tensor:
        # Only the step's own batch is staged; the few rows of a truncation bootstrap are copied plainly.
        staged = self.staging is not None and batch_size(obs) == self.num_envs
        t = self.staging.tensors(obs) if staged else as_tensors(obs, self.device)  # type: ignore[union-attr]
        if update_stats:
            self.policy.update_obs_stats(t)
        return self.policy.prepare(t)

    def act(self, x: torch.Tensor, mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        noise = self.policy.dist.noise(self.rng, x.shape[0])
        if self.staging is not None:
            noise_t = self.staging.to_device("noise", noise)
            m = None if mask is None else self.staging.to_device("mask", mask)
        else:
            noise_t = torch.from_numpy(noise).to(self.device)
            m = None if mask is None else torch.as_tensor(mask, device=self.device)
        action, logp, value, self.state = self._sample(x, self.state, noise_t, m)
        if self.starts is not None:
            self.starts[:] = False
        return action, logp, value

    def value(self, x: torch.Tensor, rows: np.ndarray | None = None) -> torch.Tensor:
        state = self.state if self.state is None or rows is None else self.state[torch.as_tensor(rows)]
        return self.policy.value(x, state)

    def end_episodes(self, ended: np.ndarray) -> None:
        if self.state is not None and ended.any():
            # By index, not by boolean mask: a mask's index_put finds its rows on the device, and waits for them.
            self.state[torch.from_numpy(np.flatnonzero(ended)).to(self.device)] = 0.0
            self.starts |= ended  # type: ignore[operator]

    def env_action(self, action: torch.Tensor) -> np.ndarray:
        if self.staging is not None:
            return self.policy.env_action(self.staging.to_host("action", action))
        return self.policy.env_action(action)


def choose_actor(policy: ActorCritic, rng: np.random.Generator, device: torch.device, fast: bool,
                 num_envs: int, compiled: bool = False,
                 say: Callable[[str], None] = print) -> tuple[Actor, str | None]:
    """(the rollout's actor, a one-line note when fast_rollout=true could not be honoured). `compiled`
    (torch_compile=true) compiles the torch actor's policy step; `say` tells of a step that fails to compile."""
    if fast:
        activation, why = covers(policy)
        if activation is not None:
            return NumpyActor(policy, activation, rng), None
        note = f"note: fast_rollout: acting through torch ({why})"
    else:
        note = None
    step = with_fallback(policy.sample_step, "the policy step", say) if compiled else None
    return TorchActor(policy, rng, device, num_envs, step=step), note


@dataclass
class Collected:
    """What one call of `collect` did."""

    obs: Any  # the observation the next step acts on
    mask: np.ndarray | None  # and its action mask
    steps: int  # env steps taken (all envs)
    complete: bool  # False when `should_stop` cut the rollout short
    returns: list[float]  # returns and lengths of the episodes that ended
    lengths: list[int]
    ended_in: list[int]  # and the env each ended in
    # A PettingZoo env's (envs/agents.py): `returns` and `lengths` are its copies' team episodes (the return summed
    # over the agents), and this their agents' own returns, in the env's agent order.
    agent_returns: list[list[float]] = field(default_factory=list)

    def agent_scalars(self, names: list[str] | None) -> dict[str, float]:
        """The mean return of each agent (charts/agent_return/NAME) and their mean over the agents
        (charts/agent_return_mean, BenchMARL's episode_reward_mean) in the team episodes that ended."""
        if not self.agent_returns or names is None:
            return {}
        by_name, mean = agent_means(self.agent_returns, names)
        return {"charts/agent_return_mean": mean, **{f"charts/agent_return/{n}": m for n, m in by_name.items()}}


def collect(envs: gym.vector.VectorEnv, actor: Actor, buffer: RolloutBuffer, obs: Any,
            reward_scaler: RewardScaler | None, should_stop: Callable[[], bool], clock: Stopwatch,
            masks: ActionMasks | None = None, mask: np.ndarray | None = None, step0: int = 0) -> Collected:
    """Fill `buffer` with n_steps steps of every env, acting with `actor` from `obs` (with action mask `mask`,
    where the env gives masks; `step0` is the global step, for messages) on.

    Rewards are scaled for training only (logged returns are the env's). A truncated step gets V(real final
    observation) to bootstrap from; a terminated one nothing (see compute_gae).
    """
    n = envs.num_envs
    # A step of a PettingZoo env's copies counts once however many agents (rows) act in each.
    frames = getattr(envs.unwrapped, "frames_per_step", n)
    rows_of_agents = hasattr(envs.unwrapped, "agents_per_copy")  # a PettingZoo env's (agents.py)
    done = Collected(obs, mask, 0, True, [], [], [])
    policy_time, env_time = clock["policy"], clock["env"]
    for _ in range(buffer.n_steps):
        if should_stop():
            done.complete = False
            break
        with policy_time:
            starts = None if actor.starts is None else actor.starts.copy()
            if starts is not None:
                buffer.keep_state(actor.state)  # type: ignore[arg-type]  # where the update's replay starts
            x = actor.inputs(obs)
            action, logp, value = actor.act(x, mask)
            env_action = actor.env_action(action)
        # which rows hold an agent in the observations acted on (the others are idle)
        alive = envs.unwrapped.alive.copy() if rows_of_agents else None
        with env_time:
            next_obs, reward, terminated, truncated, info = envs.step(env_action)
        ended = terminated | truncated
        if reward_scaler is not None:
            reward = reward_scaler(reward, ended)
        buffer.add(x, action, logp, value, reward, terminated, ended, mask, starts, alive)
        cut = np.flatnonzero(truncated & ~terminated)
        if cut.size:  # V(final obs) from the state the episode reached, before end_episodes zeroes it
            buffer.set_final_values(cut, actor.value(actor.inputs(stack(info["final_obs"][cut]), False, cut), cut))
        actor.end_episodes(ended)
        key = "team" if rows_of_agents else "episode"
        if "_" + key in info:
            finished = info["_" + key]
            done.returns.extend(info[key]["r"][finished].tolist())
            done.lengths.extend(info[key]["l"][finished].tolist())
            done.ended_in.extend(np.flatnonzero(finished).tolist())
            if rows_of_agents:
                done.agent_returns.extend(info[key]["a"][finished].tolist())
        obs = next_obs
        done.steps += frames
        if masks is not None:
            mask = masks(obs, info, envs, step0 + done.steps)
    done.obs, done.mask = obs, mask
    return done
