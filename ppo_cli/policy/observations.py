"""Observations -> the network input x, and the few operations the rollout needs on batches of observations.

An observation space is a Box, Discrete, MultiBinary or MultiDiscrete space, or a Dict or Tuple of them. Each
of its parts is encoded by its space: a Box is flattened (and normalized when env.normalize_obs is on, per
dimension, so per key), a Discrete is one-hot, a MultiDiscrete one-hot per component, a MultiBinary taken as
0/1 floats. The network input is the Box parts (in key order) followed by the others, concatenated. In a Dict
with Discrete or MultiDiscrete actions, a key named `action_mask` is the action mask (masks.py), not input.

`InputLayout` does this in torch (policy.prepare) and, beside it, in numpy (the fast rollout), on the same
statistics. Batches of observations are numpy arrays, or dicts / tuples of them (what gymnasium's vector envs
return); `as_tensors`, `stack` and `batch_size` handle both shapes.

Images (docs/pixels.md) are the exception to flat: an observation that is a uint8 Box of rank 2 or 3 whose two
largest sides are >= 16, or any such Box with env.image=true and none with env.image=false (`is_image`), is
kept as it is, uint8 [n, C, H, W] (an HWC image permuted, a rank-2 one given one channel), for an image encoder
(encoders.IMAGE_ENCODERS), which scales it to [0, 1]. The rollout buffer stores it so (`stored_shape`,
`stored_dtype`). Channel order: `channels_last` says it, or, where it is None, the shape: last dim <= 4 is HWC,
else first dim <= 4 is CHW.

One image inside a Dict or Tuple, beside other keys (a camera and a robot's joint readings, say): the network
input is then one float32 row, the image's pixel values (0-255, [C, H, W] order, flattened) followed by the
other parts as above; the image encoder takes the pixels apart, runs its convolutions on them and reads the
other columns beside the convolutions' features (`extra_dim`). Stored as float32, such an input takes 4x the
memory of a plain image's uint8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ppo_cli.config import IMAGE_ENCODERS
from ppo_cli.envs.spaces import MASK_KEY, MIN_IMAGE_SIDE, is_image, space_items
from ppo_cli.errors import UserError

MAX_CHANNELS = 4  # channel-order detection: a rank-3 side this small is the channels


@dataclass(frozen=True)
class Image:
    """An image observation's geometry: [channels, height, width] as the network reads it, and how the env gives
    it (`order`: "HWC", "CHW", "HW" for rank 2, or None where the shape does not tell and no setting says)."""

    shape: tuple[int, int, int]
    order: str | None
    space_shape: tuple[int, ...]


def _image(space: dict[str, Any], channels_last: bool | None, image: bool | str) -> Image | None:
    if space["type"] != "Box" or not is_image(space["shape"], space.get("dtype"), image):
        return None
    dims = tuple(space["shape"])
    if len(dims) == 2:
        return Image((1, dims[0], dims[1]), "HW", dims)
    if channels_last is None:
        channels_last = True if dims[2] <= MAX_CHANNELS else False if dims[0] <= MAX_CHANNELS else None
    if channels_last is None:
        return Image((dims[2], dims[0], dims[1]), None, dims)
    order = "HWC" if channels_last else "CHW"
    return Image((dims[2], dims[0], dims[1]) if channels_last else (dims[0], dims[1], dims[2]), order, dims)


def _shape_text(space: dict[str, Any]) -> str:
    return f"uint8 Box {tuple(space['shape'])}"


class Part:
    """One part of an observation (a Dict key, a Tuple index, or the whole space: `key` None) and how a batch of
    its values becomes `size` columns of the network input: `encode` (its numpy twin for the fast rollout is in
    algo/fast/observations.py). This base flattens to float32; `box` parts are the columns env.normalize_obs
    normalizes."""

    box = False

    def __init__(self, key: str | int | None, space: dict[str, Any]) -> None:
        self.key, self.space = key, space
        self.size = math.prod(space["shape"])

    def encode(self, value: torch.Tensor) -> torch.Tensor:
        return value.float().reshape(value.shape[0], -1)


class BoxPart(Part):
    """Flattened to float32, normalized with the other Box parts when env.normalize_obs is on."""

    box = True


class MultiBinaryPart(Part):
    """Its 0/1 values as float32."""


class DiscretePart(Part):
    """One-hot of the value minus the space's start."""

    def __init__(self, key: str | int | None, space: dict[str, Any]) -> None:
        self.key, self.space, self.size = key, space, space["n"]
        self.start = space.get("start", 0)

    def encode(self, value: torch.Tensor) -> torch.Tensor:
        return F.one_hot(value.long().view(-1) - self.start, self.size).float()


class MultiDiscretePart(Part):
    """One-hot per component, of the value minus the component's start, side by side."""

    def __init__(self, key: str | int | None, space: dict[str, Any]) -> None:
        self.key, self.space = key, space
        self.nvec = list(space["nvec"])
        self.size = sum(self.nvec)

    def encode(self, value: torch.Tensor) -> torch.Tensor:
        v = value.long().flatten(1) - torch.as_tensor(self.space["start"], device=value.device)
        return torch.cat([F.one_hot(v[:, i], n) for i, n in enumerate(self.nvec)], dim=1).float()


class ImagePart(Part):
    """An image observation (module doc), kept uint8 as [n, C, H, W]: a view (an HWC image permuted, which is
    channels-last in memory; a rank-2 one given one channel)."""

    def __init__(self, key: str | int | None, space: dict[str, Any], image: Image) -> None:
        self.key, self.space, self.image = key, space, image
        self.size = math.prod(image.shape)

    def encode(self, value: torch.Tensor) -> torch.Tensor:
        order = self.image.order
        return value.unsqueeze(1) if order == "HW" else value.permute(0, 3, 1, 2) if order == "HWC" else value


# The spaces an observation part can be, and how each is encoded.
PARTS: dict[str, type[Part]] = {"Box": BoxPart, "Discrete": DiscretePart, "MultiBinary": MultiBinaryPart,
                                "MultiDiscrete": MultiDiscretePart}


def _parts(space: dict[str, Any], masked: bool, channels_last: bool | None, image_mode: bool | str,
           skip: tuple[str, ...] = ()) -> list[Part]:
    structure = space["type"]
    if structure not in ("Dict", "Tuple"):
        if structure not in PARTS:
            raise UserError(f"a {structure} observation space is not supported (supported: {', '.join(PARTS)}, "
                            f"or a Dict or Tuple of them)")
        image = _image(space, channels_last, image_mode)
        return [ImagePart(None, space, image) if image is not None else PARTS[structure](None, space)]
    parts: list[Part] = []
    for key, sub in space_items(space):
        if (masked and key == MASK_KEY) or key in skip:
            continue
        if sub["type"] not in PARTS:
            raise UserError(f"observation key {key!r}: a {sub['type']} space is not supported inside a "
                            f"{structure} (supported: {', '.join(PARTS)})")
        image = _image(sub, channels_last, image_mode)
        if image is not None and any(isinstance(p, ImagePart) for p in parts):
            first = next(p.key for p in parts if isinstance(p, ImagePart))
            raise UserError(f"observation keys {first!r} and {key!r} are both images: one image per observation "
                            f"is supported (stack them into one image of more channels, or give one a float32 "
                            f"space to read it flat; docs/pixels.md)")
        parts.append(ImagePart(key, sub, image) if image is not None else PARTS[sub["type"]](key, sub))
    if not parts:
        raise UserError(f"the {structure} observation space has no key the policy can read")
    return parts


class InputLayout:
    """How a described observation space becomes the flat network input (see the module doc)."""

    def __init__(self, space: dict[str, Any], masked: bool = False, channels_last: bool | None = None,
                 image: bool | str = "auto", skip: tuple[str, ...] = ()) -> None:
        self.space, self.image_mode = space, image
        self.parts = _parts(space, masked, channels_last, image, skip)  # `skip`: Dict keys the policy does not read
        # An image (module doc): kept as uint8 [C, H, W] when it is the whole observation, never normalized.
        self.image_part = next((p for p in self.parts if isinstance(p, ImagePart)), None)
        self.image = None if self.image_part is None else self.image_part.image
        self.box_parts = [p for p in self.parts if p.box]
        self.other_parts = [p for p in self.parts if not p.box and p is not self.image_part]
        self.box_dim = sum(p.size for p in self.box_parts)
        self.dim = sum(p.size for p in self.parts)
        self.structured = space["type"] in ("Dict", "Tuple")
        # The columns beside an image (module doc): what the image encoder reads next to its convolutions.
        self.extra_dim = 0 if self.image_part is None else self.dim - self.image_part.size
        # What the network reads and the rollout buffer stores per observation.
        plain_image = self.image is not None and not self.extra_dim
        self.stored_shape: tuple[int, ...] = self.image.shape if plain_image else (self.dim,)  # type: ignore[union-attr]
        self.stored_dtype = torch.uint8 if plain_image else torch.float32
        self.stored_channels_last = plain_image  # the order the image encoders convolve in (RolloutBuffer)

    def columns(self, without: tuple[str, ...]) -> list[int]:
        """The network input's columns of every part but the keys `without` (prepare's order: an image beside
        other parts first, then the Box parts, then the others)."""
        order = ([self.image_part] if self.image_part is not None else []) + self.box_parts + self.other_parts
        out, start = [], 0
        for part in order:
            if part.key not in without:
                out += range(start, start + part.size)
            start += part.size
        return out

    def _get(self, obs: Any, part: Part) -> Any:
        return obs[part.key] if self.structured else obs

    def check(self, encoder: str, normalize_obs: bool) -> None:
        """One UserError where the encoder cannot read these observations: an image with an encoder that is not
        an image encoder, an image encoder without an image, an image without a channel order, or observation
        normalization where the image is all there is (in a Dict, the other Box keys are normalized)."""
        img = self.image
        if img is None and self.image_mode is True:
            raise UserError(f"env.image=true: this env's observation space ({_describe(self.space)}) has no uint8 "
                            f"Box of rank 2 or 3 to read as an image")
        if img is None:
            if encoder in IMAGE_ENCODERS:
                raise UserError(f"network.type={encoder} needs image observations (a uint8 Box of rank 2 or 3 whose "
                                f"two largest sides are >= {MIN_IMAGE_SIDE}, or smaller with env.image=true); this "
                                f"env's observation space is {_describe(self.space)}: use network=mlp")
            return
        key = self.image_part.key  # type: ignore[union-attr]
        shown = _shape_text(self.image_part.space)  # type: ignore[union-attr]
        if encoder not in IMAGE_ENCODERS:
            what = "the observations are images" if key is None else f"observation key {key!r} is an image"
            raise UserError(f"{what} ({shown}): use network=cnn (or network=impala, or network=auto), not "
                            f"network.type={encoder}, which would read {'them' if key is None else 'it'} as "
                            f"{math.prod(img.shape):,} flat inputs; env.image=false reads "
                            f"{'them' if key is None else 'it'} so on purpose (codes rather than pixels; "
                            f"docs/pixels.md)")
        if img.order is None:
            raise UserError(f"cannot tell the channel order of images {img.space_shape} (neither the first nor the "
                            f"last dim is <= {MAX_CHANNELS}): set network.channels_last=true (height, width, "
                            f"channels) or false (channels, height, width)")
        if normalize_obs and not self.box_parts:
            raise UserError(f"env.normalize_obs=true: image observations ({shown}) are scaled to [0, 1] inside "
                            f"the network, not normalized; set env.normalize_obs=false")

    # --- torch ---------------------------------------------------------------------------------------------
    def box_input(self, obs: Any) -> torch.Tensor | None:
        """The Box parts as float32 columns [n, box_dim] (what the normalizer's statistics are of)."""
        if not self.box_parts:
            return None
        cols = [p.encode(self._get(obs, p)) for p in self.box_parts]
        return cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)

    def prepare(self, obs: Any, norm: torch.nn.Module | None) -> torch.Tensor:
        cols = []
        if self.image_part is not None:
            image = self.image_part.encode(self._get(obs, self.image_part))
            if not self.extra_dim:
                return image
            cols.append(image.reshape(image.shape[0], -1).float())
        box = self.box_input(obs)
        if box is not None and norm is not None:
            box = norm(box)
        cols += ([box] if box is not None else []) + [p.encode(self._get(obs, p)) for p in self.other_parts]
        return cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)


def _describe(space: dict[str, Any]) -> str:
    if space["type"] == "Box":
        return f"Box {tuple(space['shape'])}" + (f" of {space['dtype']}" if "dtype" in space else "")
    return space["type"]


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
