"""Running statistics: observation normalization (inside the policy) and reward scaling (in the rollout).

Why not gymnasium's NormalizeObservation/NormalizeReward vector wrappers: in SAME_STEP autoreset mode the
real final observation of a truncated episode arrives in `info["final_obs"]`, which those wrappers leave raw,
so the truncation bootstrap V(final_obs) would see unnormalized input. Keeping the observation statistics as
buffers of the policy module instead means every caller of the policy (rollout, bootstrap, update, periodic
evaluation, ppo-eval) normalizes the same way, and the statistics travel in the policy's state_dict: saved in
every checkpoint, restored on resume, frozen whenever nobody calls `update`.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn


class ObsNormalizer(nn.Module):
    """(x - mean) / sqrt(var + eps), clipped to [-clip, clip]; statistics over every observation seen."""

    def __init__(self, dim: int, clip: float, eps: float = 1e-8) -> None:
        super().__init__()
        # float64: the count reaches millions and float32 running means drift at that scale.
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(eps, dtype=torch.float64))
        self.clip, self.eps = clip, eps
        self._refresh()

    def _refresh(self) -> None:
        # float32 copies used on the hot path, recomputed only when the statistics change.
        self._shift = self.mean.float()
        self._scale = torch.rsqrt(self.var + self.eps).float()

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge a batch [B, dim] into the statistics (Chan et al.'s parallel mean/variance)."""
        x = x.double()
        b_mean, b_var, b_count = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta = b_mean - self.mean
        total = self.count + b_count
        self.mean += delta * b_count / total
        self.var.copy_((self.var * self.count + b_var * b_count + delta.square() * self.count * b_count / total)
                       / total)
        self.count.copy_(total)
        self._refresh()

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 (shift, scale) that `forward` applies: clamp((x - shift) * scale, -clip, clip)."""
        return self._shift, self._scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp((x - self._shift) * self._scale, -self.clip, self.clip)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh()

    def _apply(self, fn: Any, recurse: bool = True) -> ObsNormalizer:
        super()._apply(fn, recurse)
        self._refresh()
        return self


class StackedObsStats:
    """The observation statistics of several runs (a batch's members: algo/batched.py) updated together: each
    member's ObsNormalizer buffers (and the float32 copies it applies) re-pointed at its row of stacked tensors, and
    `update` doing ObsNormalizer.update for every member's [envs, dim] block of a [members, envs, dim] batch."""

    def __init__(self, norms: list[ObsNormalizer]) -> None:
        self.mean, self.var = torch.stack([n.mean for n in norms]), torch.stack([n.var for n in norms])
        self.count = torch.stack([n.count for n in norms])
        self.shift, self.scale = torch.empty(self.mean.shape), torch.empty(self.mean.shape)
        self.eps = norms[0].eps
        for k, n in enumerate(norms):
            n.mean, n.var, n.count = self.mean[k], self.var[k], self.count[k]
            n._shift, n._scale = self.shift[k], self.scale[k]
        self._refresh()

    def subset(self, rows: list[int]) -> StackedObsStats:
        """Copies of members `rows`' statistics (for their evaluation: nothing updates them)."""
        part = copy.copy(self)
        part.mean, part.var, part.count = self.mean[rows], self.var[rows], self.count[rows]
        part.shift, part.scale = self.shift[rows], self.scale[rows]
        return part

    def _refresh(self) -> None:
        self.shift.copy_(self.mean.float())
        self.scale.copy_(torch.rsqrt(self.var + self.eps).float())

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """ObsNormalizer.update of member k with x[k], for every k (x: [members, B, dim])."""
        x = x.double()
        b_mean, b_var, b_count = x.mean(1), x.var(1, unbiased=False), x.shape[1]
        count = self.count[:, None]
        delta = b_mean - self.mean
        total = count + b_count
        self.mean += delta * b_count / total
        self.var.copy_((self.var * count + b_var * b_count + delta.square() * count * b_count / total) / total)
        self.count.copy_(total[:, 0])
        self._refresh()


class RewardScaler:
    """Divide rewards by the running std of the discounted return, then clip (PPO's usual reward scaling).

    The return accumulator is per env and restarts at every episode end. Only training rewards are scaled:
    logged episode returns and every evaluation use the env's own rewards.
    """

    def __init__(self, num_envs: int, gamma: float, clip: float, eps: float = 1e-8) -> None:
        self.gamma, self.clip, self.eps = gamma, clip, eps
        self.returns = np.zeros(num_envs)
        self.mean, self.var, self.count = 0.0, 1.0, eps

    def __call__(self, rewards: np.ndarray, episode_end: np.ndarray) -> np.ndarray:
        self.returns = self.returns * self.gamma + rewards
        b_mean, b_var, b_count = float(self.returns.mean()), float(self.returns.var()), len(rewards)
        delta, total = b_mean - self.mean, self.count + b_count
        self.mean += delta * b_count / total
        self.var = (self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total) / total
        self.count = total
        self.returns[episode_end] = 0.0
        scaled = rewards / np.sqrt(self.var + self.eps)
        return np.clip(scaled, -self.clip, self.clip).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"returns": torch.from_numpy(self.returns.copy()), "mean": self.mean, "var": self.var,
                "count": self.count}

    def load_state_dict(self, state: dict[str, Any], episodes: bool = True) -> None:
        """The statistics, and with `episodes` the per-env discounted returns of the episodes in progress; without
        (the envs restart from a reset, maybe another number of them) those restart at zero."""
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])
        self.returns = state["returns"].numpy().copy() if episodes else np.zeros_like(self.returns)
