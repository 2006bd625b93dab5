"""Observations -> the network input x, and the few operations the rollout needs on batches of observations.

An observation space is a Box, Discrete, MultiBinary or MultiDiscrete space, or a Dict or Tuple of them. Each
of its parts is encoded by its space: a Box is flattened (and normalized when env.normalize_obs is on, per
dimension, so per key), a Discrete is one-hot, a MultiDiscrete one-hot per component, a MultiBinary taken as
0/1 floats. The network input is the Box parts (in key order) followed by the others, concatenated. In a Dict
with Discrete or MultiDiscrete actions, a key named `action_mask` is the action mask (masks.py), not input.

`InputLayout` does this in torch (policy.prepare) and, beside it, in numpy (the fast rollout), on the same
statistics. Batches of observations are numpy arrays, or dicts / tuples of them (what gymnasium's vector envs
return); `as_tensors`, `stack` and `batch_size` handle both shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ppo_cli.errors import UserError

MASK_KEY = "action_mask"
PART_SPACES = ("Box", "Discrete", "MultiBinary", "MultiDiscrete")


@dataclass(frozen=True)
class Part:
    key: str | int | None  # the Dict key or Tuple index; None for a plain space
    kind: str  # a PART_SPACES name
    size: int  # columns of the network input
    space: dict[str, Any]


def _parts(space: dict[str, Any], masked: bool) -> list[Part]:
    if space["type"] in ("Dict", "Tuple"):
        items = space["spaces"].items() if space["type"] == "Dict" else enumerate(space["spaces"])
        parts = []
        for key, sub in items:
            if masked and key == MASK_KEY:
                continue
            if sub["type"] not in PART_SPACES:
                raise UserError(f"observation key {key!r}: a {sub['type']} space is not supported inside a "
                                f"{space['type']} (supported: {', '.join(PART_SPACES)})")
            parts.append(_part(key, sub))
        if not parts:
            raise UserError(f"the {space['type']} observation space has no key the policy can read")
        return parts
    return [_part(None, space)]


def _part(key: str | int | None, space: dict[str, Any]) -> Part:
    kind = space["type"]
    if kind == "Discrete":
        size = space["n"]
    elif kind == "MultiDiscrete":
        size = sum(space["nvec"])
    else:
        size = math.prod(space["shape"])
    return Part(key, kind, size, space)


class InputLayout:
    """How a described observation space becomes the flat network input (see the module doc)."""

    def __init__(self, space: dict[str, Any], masked: bool = False) -> None:
        self.space = space
        self.parts = _parts(space, masked)
        self.box_parts = [p for p in self.parts if p.kind == "Box"]
        self.other_parts = [p for p in self.parts if p.kind != "Box"]
        self.box_dim = sum(p.size for p in self.box_parts)
        self.dim = sum(p.size for p in self.parts)
        self.structured = space["type"] in ("Dict", "Tuple")
        # One-hot tables of the numpy twin, one per Discrete (or MultiDiscrete component), made once.
        self._eyes = {id(p): [np.eye(n, dtype=np.float32) for n in p.space.get("nvec", [p.size])]
                      for p in self.other_parts if p.kind in ("Discrete", "MultiDiscrete")}

    def _get(self, obs: Any, part: Part) -> Any:
        return obs[part.key] if self.structured else obs

    # --- torch ---------------------------------------------------------------------------------------------
    def box_input(self, obs: Any) -> torch.Tensor | None:
        """The Box parts as float32 columns [n, box_dim] (what the normalizer's statistics are of)."""
        if not self.box_parts:
            return None
        cols = [self._get(obs, p).float().reshape(self._get(obs, p).shape[0], -1) for p in self.box_parts]
        return cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)

    def _encode(self, part: Part, value: torch.Tensor) -> torch.Tensor:
        if part.kind == "Discrete":
            return F.one_hot(value.long().view(-1) - part.space.get("start", 0), part.size).float()
        if part.kind == "MultiDiscrete":
            v = value.long().flatten(1) - torch.as_tensor(part.space["start"], device=value.device)
            return torch.cat([F.one_hot(v[:, i], n) for i, n in enumerate(part.space["nvec"])], dim=1).float()
        return value.float().flatten(1)  # MultiBinary

    def prepare(self, obs: Any, norm: torch.nn.Module | None) -> torch.Tensor:
        box = self.box_input(obs)
        if box is not None and norm is not None:
            box = norm(box)
        cols = ([box] if box is not None else []) + [self._encode(p, self._get(obs, p)) for p in self.other_parts]
        return cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)

    # --- numpy twin (fastpath.NumpyActor) ------------------------------------------------------------------
    def np_box_input(self, obs: Any) -> np.ndarray | None:
        if not self.box_parts:
            return None
        cols = [self._get(obs, p) for p in self.box_parts]
        cols = [c.reshape(c.shape[0], -1).astype(np.float32, copy=False) for c in cols]
        return cols[0] if len(cols) == 1 else np.concatenate(cols, axis=1)

    def _np_encode(self, part: Part, value: np.ndarray) -> np.ndarray:
        if part.kind == "Discrete":
            return self._eyes[id(part)][0][value.reshape(-1) - part.space.get("start", 0)]
        if part.kind == "MultiDiscrete":
            v = value.reshape(value.shape[0], -1) - np.asarray(part.space["start"])
            return np.concatenate([eye[v[:, i]] for i, eye in enumerate(self._eyes[id(part)])], axis=1)
        return value.reshape(value.shape[0], -1).astype(np.float32)

    def np_prepare(self, obs: Any, norm: Any, update_stats: bool) -> np.ndarray:
        """prepare in numpy; folds the Box parts into `norm`'s statistics first when `update_stats`."""
        box = self.np_box_input(obs)
        if box is not None and norm is not None:
            if update_stats:
                norm.update(torch.from_numpy(box))
            box = np.clip((box - norm._shift.numpy()) * norm._scale.numpy(), -norm.clip, norm.clip)
        cols = ([box] if box is not None else []) + [self._np_encode(p, self._get(obs, p)) for p in self.other_parts]
        return cols[0] if len(cols) == 1 else np.concatenate(cols, axis=1)


def as_tensors(obs: Any, device: torch.device | str = "cpu") -> Any:
    """A batch of observations (array, dict or tuple of arrays) as tensors of the same structure."""
    if isinstance(obs, dict):
        return {k: torch.as_tensor(v, device=device) for k, v in obs.items()}
    if isinstance(obs, tuple):
        return tuple(torch.as_tensor(v, device=device) for v in obs)
    return torch.as_tensor(obs, device=device)


def as_arrays(obs: Any) -> Any:
    """as_tensors undone (a checkpoint's tensors back to numpy)."""
    if isinstance(obs, dict):
        return {k: v.numpy() for k, v in obs.items()}
    if isinstance(obs, (tuple, list)):
        return tuple(v.numpy() for v in obs)
    return obs.numpy()


def stack(items: Any) -> Any:
    """One batch from single observations (what a vector env's info['final_obs'] holds)."""
    first = items[0]
    if isinstance(first, dict):
        return {k: np.stack([o[k] for o in items]) for k in first}
    if isinstance(first, tuple):
        return tuple(np.stack([o[i] for o in items]) for i in range(len(first)))
    return np.stack(items)


def batch_size(obs: Any) -> int:
    if isinstance(obs, dict):
        return len(next(iter(obs.values())))
    if isinstance(obs, (tuple, list)):
        return len(obs[0])
    return len(obs)
