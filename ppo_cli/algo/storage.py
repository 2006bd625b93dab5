"""Rollout storage: preallocated [n_steps, num_envs, ...] tensors written one step at a time, GAE over them, and
the flat `Batch` the update reads.

Each stored step t of env i holds the observation the action was taken in, the action, its log-prob and
value under the old policy, the reward, whether the episode terminated, whether it ended for any reason,
and, for a time-limit truncation, V(real final observation) to bootstrap from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ppo_cli.devices import check_fits, stages
from ppo_cli.errors import UserError


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor,
                terminated: torch.Tensor, episode_end: torch.Tensor, gamma: float | np.ndarray,
                gae_lambda: float | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, all tensors [T, N]; gamma and lambda are floats, or [N] float64 arrays (the members
    of a batched run, each env with its member's).

    delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)
    A_t     = delta_t + gamma * lambda * (1 - episode_end_t) * A_{t+1}
    R_t     = A_t + V(s_t)

    next_values[t] is V of the observation that followed step t: for a truncated step that is the real final
    observation, never the reset observation the vector env hands back in its place.
    """
    not_term = 1.0 - terminated
    not_end = 1.0 - episode_end
    # gamma * lambda in float64 first, as for floats, then float32 as torch takes a Python number
    discount = _coef(gamma * gae_lambda, rewards.device)
    deltas = rewards + _coef(gamma, rewards.device) * next_values * not_term - values
    advantages = torch.empty_like(rewards)
    # The backward recursion is T small steps over N envs: on the CPU it runs on numpy views of the same
    # memory, where each step costs about a microsecond instead of torch's several.
    on_cpu = rewards.device.type == "cpu"
    adv, delta, carry = (advantages.numpy(), deltas.numpy(), (discount * not_end).numpy()) if on_cpu \
        else (advantages, deltas, discount * not_end)
    running = delta[-1] * 0
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = delta[t] + carry[t] * running
        adv[t] = running
    return advantages, advantages + values


def _coef(value: float | np.ndarray, device: torch.device) -> float | torch.Tensor:
    return value if np.ndim(value) == 0 else torch.as_tensor(np.asarray(value).astype(np.float32), device=device)


@dataclass
class Batch:
    """Flat [T*N, ...] samples for the update (a minibatch is a Batch indexed by a permutation slice)."""

    obs: torch.Tensor
    actions: torch.Tensor
    logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    masks: torch.Tensor | None = None  # the action masks the actions were sampled under (masks.py)
    # Recurrent policies: whether the state was zeroed before the step (an episode start), the state the step's
    # sequence started from (the same in every row of a sequence), the sequence length (0: no sequences) and the
    # number of envs (rows t * envs + env: a sequence is one env's steps of one chunk of seq_len steps).
    starts: torch.Tensor | None = None
    states: torch.Tensor | None = None
    seq_len: int = 0
    envs: int = 0

    def __len__(self) -> int:
        return self.obs.shape[0]

    def __getitem__(self, idx: torch.Tensor | slice) -> Batch:
        """Rows by index tensor (a copy) or by slice (views, no copy)."""
        def rows(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]

        return Batch(self.obs[idx], self.actions[idx], self.logp[idx], self.values[idx], self.advantages[idx],
                     self.returns[idx], rows(self.masks), rows(self.starts), rows(self.states), self.seq_len,
                     self.envs)


# Float32 columns of every stored step: log-prob, value, reward, terminated, episode end, V(final obs), and the
# advantage and return GAE computes.
_FLOAT_COLUMNS = 8


def rollout_bytes(n_steps: int, num_envs: int, obs_shape: tuple[int, ...], obs_dtype: torch.dtype,
                  action_shape: tuple[int, ...], action_dtype: torch.dtype, mask_size: int | None = None,
                  state_size: int = 0, seq_len: int | None = None) -> int:
    """The bytes a RolloutBuffer of these sizes takes on its device, with GAE's advantages and returns."""
    def size(shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return math.prod(shape) * torch.empty((), dtype=dtype).element_size()

    step = (size(obs_shape, obs_dtype) + size(action_shape, action_dtype) + 4 * _FLOAT_COLUMNS + (mask_size or 0)
            + (1 if state_size else 0))
    # The states the chunks start from, and in the update's batch the state of each row's chunk.
    chunks = -(-n_steps // (seq_len or n_steps))
    return n_steps * num_envs * step + (chunks + n_steps) * num_envs * state_size * 4


def check_rollout_fits(n_steps: int, num_envs: int, device: torch.device, obs_shape: tuple[int, ...] = (1,),
                       obs_dtype: torch.dtype = torch.uint8, action_shape: tuple[int, ...] = (1,),
                       action_dtype: torch.dtype = torch.uint8, mask_size: int | None = None,
                       state_size: int = 0, seq_len: int | None = None) -> None:
    """Refuse, in one line, a rollout `device` cannot hold. The defaults (one-byte observations and actions)
    give a lower bound, for a check before the spaces are known."""
    needed = rollout_bytes(n_steps, num_envs, obs_shape, obs_dtype, action_shape, action_dtype, mask_size,
                           state_size, seq_len)
    check_fits(needed, device, f"the rollout of algo.n_steps {n_steps:,} x env.num_envs {num_envs:,} steps",
               "lower algo.n_steps or env.num_envs")


class RolloutBuffer:
    """Preallocated [n_steps, num_envs, ...] storage, written one step at a time through `add`.

    Each field is written where it is produced. What the policy computes (inputs, actions, log-probs, values,
    V(final obs)) goes straight into the tensors on the policy's device. What the envs return (rewards, ends,
    masks, episode starts) is numpy on the host: on the CPU it is written through numpy views of the same tensors;
    on another device (`staged`) into host buffers (page-locked on a GPU) that `advantages` copies over once per
    rollout, so a GPU rollout step never waits on a copy of its own.
    """

    POLICY_FIELDS = ("obs", "actions", "logp", "values")
    ENV_FIELDS = ("rewards", "terminated", "episode_end")

    def __init__(self, n_steps: int, num_envs: int, obs_shape: tuple[int, ...], obs_dtype: torch.dtype,
                 action_shape: tuple[int, ...], action_dtype: torch.dtype, device: torch.device,
                 mask_size: int | None = None, state_size: int = 0, staged: bool | None = None,
                 obs_channels_last: bool = False, seq_len: int | None = None, idle_rows: bool = False) -> None:
        def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros((n_steps, num_envs, *shape), dtype=dtype, device=device)

        self.n_steps, self.num_envs, self.device = n_steps, num_envs, torch.device(device)
        if obs_channels_last:
            # Images [C, H, W] laid out as [H, W, C] in memory: the order the image encoders convolve in, so each
            # step's copy into the buffer reorders the 8 new images once, where the update would reorder every
            # minibatch in every epoch (a shuffle's indexing keeps the order: docs/pixels.md has the figures).
            c, h, w = obs_shape
            self.obs = zeros(h, w, c, dtype=obs_dtype).permute(0, 1, 4, 2, 3)
        else:
            self.obs = zeros(*obs_shape, dtype=obs_dtype)
        self.actions = zeros(*action_shape, dtype=action_dtype)
        self.logp = zeros()
        self.values = zeros()
        self.rewards = zeros()
        self.terminated = zeros()
        self.episode_end = zeros()
        self.final_values = zeros()  # V(final obs) at truncated steps, else 0
        self.masks = None if mask_size is None else zeros(mask_size, dtype=torch.bool)
        self.starts = zeros(dtype=torch.bool) if state_size else None
        # `idle_rows`: envs whose rows may hold no agent for a while (an agent of a PettingZoo env that finished
        # early or has not joined: envs/agents.py); those steps are stored as not alive and left out of the update.
        self.alive = zeros(dtype=torch.bool) if idle_rows else None
        # Recurrent policies: the update replays chunks of seq_len steps (the whole rollout by default), each from
        # the state its env's policy had as the chunk began (truncated back-propagation through time).
        self.seq_len = seq_len or n_steps
        self.chunk_states = (torch.zeros(n_steps // self.seq_len, num_envs, state_size, device=device)
                             if state_size else None)
        self.step = 0
        self.staged = stages(self.device) if staged is None else staged
        env_fields = [getattr(self, f) for f in self.ENV_FIELDS] + [t for t in (self.masks, self.starts, self.alive)
                                                                      if t is not None]
        # (device tensor, its host twin) for each env field; on the CPU unstaged, the twin is the tensor itself.
        pin = self.device.type == "cuda"
        self._uploads = [(t, torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) if self.staged else t)
                         for t in env_fields]
        host = iter(h.numpy() for _, h in self._uploads)
        self._env_rows = [next(host) for _ in self.ENV_FIELDS]
        self._masks = None if self.masks is None else next(host)
        self._starts = None if self.starts is None else next(host)
        self._alive = None if self.alive is None else next(host)
        # On the CPU, the policy's outputs are written through numpy views too: a numpy row assignment costs about
        # a microsecond, a torch one several, and the rollout writes eight per step. Elsewhere, device copies.
        self._policy_rows = [getattr(self, f) if self.staged else getattr(self, f).numpy()
                             for f in self.POLICY_FIELDS]
        self._uploaded: Any = None  # a CUDA event after the upload of the envs' side

    def add(self, obs: torch.Tensor | np.ndarray, actions: torch.Tensor | np.ndarray,
            logp: torch.Tensor | np.ndarray, values: torch.Tensor | np.ndarray, rewards: np.ndarray,
            terminated: np.ndarray, episode_end: np.ndarray, masks: np.ndarray | None = None,
            starts: np.ndarray | None = None, alive: np.ndarray | None = None) -> None:
        """Store one step of every env: the policy's outputs as it gave them (tensors on its device, or the numpy
        actor's arrays on the CPU), the envs' as numpy arrays."""
        t = self.step
        if t == 0:
            self.final_values.zero_()
            if self._uploaded is not None:  # the last rollout's upload still reads the host buffers
                self._uploaded.synchronize()
                self._uploaded = None
        if self._masks is not None:
            self._masks[t] = masks
        if self._starts is not None:
            self._starts[t] = starts
        if self._alive is not None:
            self._alive[t] = alive
        r_obs, r_act, r_logp, r_val = self._policy_rows
        if self.staged:
            obs, actions, logp, values = (torch.as_tensor(v, device=self.device)
                                          for v in (obs, actions, logp, values))
        r_obs[t], r_act[t], r_logp[t], r_val[t] = obs, actions, logp, values
        r_rew, r_term, r_end = self._env_rows
        r_rew[t], r_term[t], r_end[t] = rewards, terminated, episode_end
        self.step = t + 1

    def keep_state(self, state: torch.Tensor) -> None:
        """The recurrent state of every env as the next step begins; kept where that step starts a chunk."""
        if self.chunk_states is not None and self.step % self.seq_len == 0:
            self.chunk_states[self.step // self.seq_len].copy_(state)

    def set_final_values(self, env_idx: np.ndarray, values: torch.Tensor | np.ndarray) -> None:
        """Record V(final obs) for envs truncated at the step just added."""
        rows = torch.as_tensor(env_idx, device=self.device)
        self.final_values[self.step - 1, rows] = torch.as_tensor(values, device=self.device)

    @property
    def full(self) -> bool:
        return self.step == self.n_steps

    def advantages(self, last_values: torch.Tensor, gamma: float | np.ndarray,
                   gae_lambda: float | np.ndarray) -> Batch:
        """GAE over the full buffer, then flatten to [T*N, ...]; `last_values` = V(obs after the last step)."""
        if self.staged:  # the envs' side of the rollout, in one copy per field
            for tensor, host in self._uploads:
                tensor.copy_(host, non_blocking=True)
            if self.device.type == "cuda":
                self._uploaded = torch.cuda.Event()
                self._uploaded.record()
        next_values = torch.cat([self.values[1:], torch.as_tensor(last_values, device=self.device).unsqueeze(0)])
        # Where an episode ended, the next stored value belongs to the reset observation: use V(final obs)
        # (truncation) or nothing (termination, masked inside compute_gae).
        next_values = torch.where(self.episode_end.bool(), self.final_values, next_values)
        adv, ret = compute_gae(self.rewards, self.values, next_values, self.terminated, self.episode_end,
                               gamma, gae_lambda)
        self.step = 0
        masks = None if self.masks is None else self.masks.flatten(0, 1)
        if self.chunk_states is None:
            batch = Batch(self.obs.flatten(0, 1), self.actions.flatten(0, 1), self.logp.flatten(),
                          self.values.flatten(), adv.flatten(), ret.flatten(), masks)
            if self.alive is not None and not bool(self.alive.all()):
                batch = batch[torch.nonzero(self.alive.flatten()).squeeze(1)]
            return batch
        if self.alive is not None and not bool(self.alive.all()):
            raise UserError("network.recurrent replays whole rows of the rollout, and an agent of this env left "
                            "early or joined late (an idle row): use a policy without a recurrent core")
        states = self.chunk_states.repeat_interleave(self.seq_len, dim=0).flatten(0, 1)  # each row: its chunk's
        return Batch(self.obs.flatten(0, 1), self.actions.flatten(0, 1), self.logp.flatten(), self.values.flatten(),
                     adv.flatten(), ret.flatten(), masks, self.starts.flatten(), states,  # type: ignore[union-attr]
                     self.seq_len, self.num_envs)
