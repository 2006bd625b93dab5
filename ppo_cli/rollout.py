"""Rollout storage: preallocated [n_steps, num_envs, ...] tensors, and GAE over them.

Each stored step t of env i holds the observation the action was taken in, the action, its log-prob and
value under the old policy, the reward, whether the episode terminated, whether it ended for any reason,
and, for a time-limit truncation, V(real final observation) to bootstrap from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor,
                terminated: torch.Tensor, episode_end: torch.Tensor, gamma: float,
                gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, all tensors [T, N].

    delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)
    A_t     = delta_t + gamma * lambda * (1 - episode_end_t) * A_{t+1}
    R_t     = A_t + V(s_t)

    next_values[t] is V of the observation that followed step t: for a truncated step that is the real final
    observation, never the reset observation the vector env hands back in its place.
    """
    not_term = 1.0 - terminated
    not_end = 1.0 - episode_end
    deltas = rewards + gamma * next_values * not_term - values
    advantages = torch.empty_like(rewards)
    # The backward recursion is T small steps over N envs: on the CPU it runs on numpy views of the same
    # memory, where each step costs about a microsecond instead of torch's several.
    on_cpu = rewards.device.type == "cpu"
    adv, delta, carry = (advantages.numpy(), deltas.numpy(), (gamma * gae_lambda * not_end).numpy()) if on_cpu \
        else (advantages, deltas, gamma * gae_lambda * not_end)
    running = delta[-1] * 0
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = delta[t] + carry[t] * running
        adv[t] = running
    return advantages, advantages + values


@dataclass
class Batch:
    """Flat [T*N, ...] samples for the update (a minibatch is a Batch indexed by a permutation slice)."""

    obs: torch.Tensor
    actions: torch.Tensor
    logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def __len__(self) -> int:
        return self.obs.shape[0]

    def __getitem__(self, idx: torch.Tensor | slice) -> Batch:
        """Rows by index tensor (a copy) or by slice (views, no copy)."""
        return Batch(self.obs[idx], self.actions[idx], self.logp[idx], self.values[idx],
                     self.advantages[idx], self.returns[idx])


class RolloutBuffer:
    def __init__(self, n_steps: int, num_envs: int, obs_shape: tuple[int, ...], obs_dtype: torch.dtype,
                 action_shape: tuple[int, ...], action_dtype: torch.dtype, device: torch.device) -> None:
        def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros((n_steps, num_envs, *shape), dtype=dtype, device=device)

        self.n_steps, self.num_envs = n_steps, num_envs
        self.obs = zeros(*obs_shape, dtype=obs_dtype)
        self.actions = zeros(*action_shape, dtype=action_dtype)
        self.logp = zeros()
        self.values = zeros()
        self.rewards = zeros()
        self.terminated = zeros()
        self.episode_end = zeros()
        self.final_values = zeros()  # V(final obs) at truncated steps, else 0
        self.step = 0

    def add(self, obs: torch.Tensor, actions: torch.Tensor, logp: torch.Tensor, values: torch.Tensor,
            rewards: torch.Tensor, terminated: torch.Tensor, episode_end: torch.Tensor) -> None:
        t = self.step
        self.obs[t], self.actions[t], self.logp[t], self.values[t] = obs, actions, logp, values
        self.rewards[t], self.terminated[t], self.episode_end[t] = rewards, terminated, episode_end
        self.final_values[t] = 0.0
        self.step += 1

    def set_final_values(self, env_idx: torch.Tensor, values: torch.Tensor) -> None:
        """Record V(final obs) for envs truncated at the step just added."""
        self.final_values[self.step - 1, env_idx] = values

    @property
    def full(self) -> bool:
        return self.step == self.n_steps

    def advantages(self, last_values: torch.Tensor, gamma: float, gae_lambda: float) -> Batch:
        """GAE over the full buffer, then flatten to [T*N, ...]; `last_values` = V(obs after the last step)."""
        next_values = torch.cat([self.values[1:], last_values.unsqueeze(0)])
        # Where an episode ended, the next stored value belongs to the reset observation: use V(final obs)
        # (truncation) or nothing (termination, masked inside compute_gae).
        next_values = torch.where(self.episode_end.bool(), self.final_values, next_values)
        adv, ret = compute_gae(self.rewards, self.values, next_values, self.terminated, self.episode_end,
                               gamma, gae_lambda)
        self.step = 0
        return Batch(self.obs.flatten(0, 1), self.actions.flatten(0, 1), self.logp.flatten(),
                     self.values.flatten(), adv.flatten(), ret.flatten())
