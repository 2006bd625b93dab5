"""The numpy twin of the policy's `prepare` (policy/observations.py's InputLayout): each observation part encoded
as its torch `encode` does, the Box parts folded into and normalized by the policy's own statistics. One encoder
per part class, reading only the part's public attributes; a part without one is not covered (core.covers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ppo_cli.policy.normalize import ObsNormalizer
from ppo_cli.policy.observations import (
    BoxPart,
    DiscretePart,
    ImagePart,
    InputLayout,
    MultiBinaryPart,
    MultiDiscretePart,
    Part,
)

Encoder = Callable[[np.ndarray], np.ndarray]


def _flat(part: Part) -> Encoder:
    return lambda value: value.reshape(value.shape[0], -1).astype(np.float32, copy=False)


def _one_hot(part: DiscretePart) -> Encoder:
    eye = np.eye(part.size, dtype=np.float32)  # the one-hot table, made once
    return lambda value: eye[value.reshape(-1) - part.start]


def _one_hots(part: MultiDiscretePart) -> Encoder:
    eyes = [np.eye(n, dtype=np.float32) for n in part.nvec]
    start = np.asarray(part.space["start"])

    def encode(value: np.ndarray) -> np.ndarray:
        v = value.reshape(value.shape[0], -1) - start
        return np.concatenate([eye[v[:, i]] for i, eye in enumerate(eyes)], axis=1)

    return encode


def _image(part: ImagePart) -> Encoder:
    order = part.image.order
    return lambda value: value[:, None] if order == "HW" else value.transpose(0, 3, 1, 2) if order == "HWC" else value


# Part class -> the factory of its numpy encoder; by exact class, so a subclass (an encoding of its own) is not
# covered.
ENCODERS: dict[type[Part], Callable[[Any], Encoder]] = {
    BoxPart: _flat, MultiBinaryPart: _flat, DiscretePart: _one_hot, MultiDiscretePart: _one_hots, ImagePart: _image}


def uncovered_parts(layout: InputLayout) -> list[str]:
    """The part classes of `layout` that have no numpy encoder."""
    return sorted({type(p).__name__ for p in layout.parts if type(p) not in ENCODERS})


class NumpyInput:
    """`prepare(obs)`: the network input of a raw observation batch, in numpy, as `layout.prepare` gives it."""

    def __init__(self, layout: InputLayout, norm: ObsNormalizer | None) -> None:
        self.layout, self.norm = layout, norm
        self.encoders = {id(p): ENCODERS[type(p)](p) for p in layout.parts}

    def _encode(self, obs: Any, part: Part) -> np.ndarray:
        return self.encoders[id(part)](obs[part.key] if self.layout.structured else obs)

    def normalized(self, box: np.ndarray, update_stats: bool) -> np.ndarray:
        """The Box columns by the policy's statistics (folded in first when `update_stats`), as its torch `prepare`
        normalizes them."""
        if update_stats:
            self.norm.update(torch.from_numpy(box))  # type: ignore[union-attr]
        shift, scale = self.norm.affine()  # type: ignore[union-attr]
        return np.clip((box - shift.numpy()) * scale.numpy(), -self.norm.clip, self.norm.clip)  # type: ignore[union-attr]

    def box_input(self, obs: Any) -> np.ndarray | None:
        if not self.layout.box_parts:
            return None
        cols = [self._encode(obs, p) for p in self.layout.box_parts]
        return cols[0] if len(cols) == 1 else np.concatenate(cols, axis=1)

    def prepare(self, obs: Any, update_stats: bool,
                normalize: Callable[[np.ndarray, bool], np.ndarray] | None = None) -> np.ndarray:
        """layout.prepare in numpy; folds the Box parts into the statistics first when `update_stats`. `normalize`
        replaces `normalized` (a batch of runs: each member's rows by its own statistics, algo/batched.py)."""
        layout, cols = self.layout, []
        if layout.image_part is not None:
            image = self._encode(obs, layout.image_part)
            if not layout.extra_dim:
                return image
            cols.append(image.reshape(image.shape[0], -1).astype(np.float32))
        box = self.box_input(obs)
        if box is not None and self.norm is not None:
            box = (normalize or self.normalized)(box, update_stats)
        cols += ([box] if box is not None else []) + [self._encode(obs, p) for p in layout.other_parts]
        return cols[0] if len(cols) == 1 else np.concatenate(cols, axis=1)
