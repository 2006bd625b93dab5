"""Spaces in one place: which gymnasium spaces ppo-cli trains on, the plain-data description of a space that
checkpoints and exports store (`describe_space`, read back without the env), and the questions every stage asks
of a described space (is it an image, its parts, the action-mask key). Both env backends check their spaces here.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from ppo_cli.errors import UserError

MASK_KEY = "action_mask"
# env.image=auto reads a uint8 Box of rank 2 or 3 as an image when its two largest sides are at least this: smaller
# byte arrays are more often codes (MiniGrid's 7x7x3 grid of object, colour and state ids) than pixels.
MIN_IMAGE_SIDE = 16
SUPPORTED_ACTIONS = (gym.spaces.Discrete, gym.spaces.Box, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)
# Observations: these, or a Dict or Tuple of them (observations.py says how each becomes network input).
SUPPORTED_OBS = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)



def is_image(shape: Any, dtype: Any, image: bool | str = "auto") -> bool:
    """Whether a Box of this shape and dtype is read as an image (`image`: env.image): a uint8 Box of rank 2 or 3
    where env.image is true, or where it is auto and the two largest sides are >= MIN_IMAGE_SIDE; never where it
    is false."""
    shape = tuple(shape)
    if str(dtype) != "uint8" or len(shape) not in (2, 3) or image is False:
        return False
    return image is True or sorted(shape)[-2] >= MIN_IMAGE_SIDE


def space_items(space: dict[str, Any]) -> list[tuple[str | int | None, dict[str, Any]]]:
    """A described space's sub-spaces with their Dict keys or Tuple indices, or [(None, space)] for a plain one."""
    if space["type"] == "Dict":
        return list(space["spaces"].items())
    if space["type"] == "Tuple":
        return list(enumerate(space["spaces"]))
    return [(None, space)]


def assemble(space: dict[str, Any], values: list[Any]) -> Any:
    """A batch of `space`'s observations from its parts' values in space_items order (space_items undone)."""
    if space["type"] == "Dict":
        return dict(zip(space["spaces"], values, strict=True))
    return tuple(values) if space["type"] == "Tuple" else values[0]


def same_space(stored: dict[str, Any], actual: dict[str, Any]) -> bool:
    """Whether an env's described space (describe_space) is the one a checkpoint or an export stored. Files
    written before every uint8 Box was described as such left `dtype` out where the Box was not an image: there
    the absence matches "uint8" (the policy, rebuilt from the stored description, reads it flat as it did)."""
    if stored == actual:
        return True
    if stored.get("type") != actual.get("type"):
        return False
    if stored["type"] == "Box":
        legacy = "dtype" not in stored and actual.get("dtype") == "uint8"
        return legacy and stored == {k: v for k, v in actual.items() if k != "dtype"}
    if stored["type"] == "Dict":
        return (list(stored["spaces"]) == list(actual["spaces"])
                and all(same_space(stored["spaces"][k], actual["spaces"][k]) for k in stored["spaces"]))
    if stored["type"] == "Tuple":
        return len(stored["spaces"]) == len(actual["spaces"]) and all(
            same_space(a, b) for a, b in zip(stored["spaces"], actual["spaces"], strict=True))
    return False


def check_spaces(obs_space: gym.Space, act_space: gym.Space, env_id: str) -> None:
    if not isinstance(act_space, SUPPORTED_ACTIONS) or (
            isinstance(act_space, gym.spaces.Box) and not np.issubdtype(act_space.dtype, np.floating)):
        raise UserError(f"{env_id!r}: action space {act_space} is not supported "
                        f"(supported: {', '.join(c.__name__ for c in SUPPORTED_ACTIONS)})")
    names = ", ".join(c.__name__ for c in SUPPORTED_OBS)
    if isinstance(obs_space, (gym.spaces.Dict, gym.spaces.Tuple)):
        items = obs_space.spaces.items() if isinstance(obs_space, gym.spaces.Dict) else enumerate(obs_space.spaces)
        items = list(items)
        readable = [str(k) for k, sub in items if isinstance(sub, SUPPORTED_OBS)]
        for key, sub in items:
            if not isinstance(sub, SUPPORTED_OBS):
                keep = (f"; keep the others with env.obs_keys=[{', '.join(readable)}]"
                        if readable and isinstance(obs_space, gym.spaces.Dict) else "")
                raise UserError(f"{env_id!r}: observation key {key!r} has space {sub}, which is not supported "
                                f"inside a {type(obs_space).__name__} (supported: {names}){keep}")
    elif not isinstance(obs_space, SUPPORTED_OBS):
        raise UserError(f"{env_id!r}: observation space {obs_space} is not supported (supported: {names}, or a "
                        f"Dict or Tuple of them)")


def describe_space(space: gym.Space, bounds: bool = False) -> dict[str, Any]:
    """A plain-data description of a space, stored in checkpoints to rebuild the policy without the env.

    `bounds`: also record a Box's low/high (action spaces: the policy clips to them; observation bounds are
    not needed and can be large).
    """
    if isinstance(space, gym.spaces.Discrete):
        if int(space.start) != 0:
            return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
        return {"type": "Discrete", "n": int(space.n)}
    if isinstance(space, gym.spaces.Box):
        out: dict[str, Any] = {"type": "Box", "shape": list(space.shape)}
        if bounds:
            out.update(low=space.low.flatten().tolist(), high=space.high.flatten().tolist())
            if space.dtype != np.float32:  # float32, the usual, is left unsaid: older checkpoints describe it so
                out["dtype"] = str(space.dtype)
        elif space.dtype == np.uint8:  # bytes may be an image (is_image, env.image), read as bytes (observations.py)
            out["dtype"] = "uint8"
        return out
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "shape": list(space.shape), "nvec": space.nvec.flatten().tolist(),
                "start": space.start.flatten().tolist()}
    if isinstance(space, gym.spaces.MultiBinary):
        return {"type": "MultiBinary", "shape": list(np.atleast_1d(space.n).tolist())}
    if isinstance(space, gym.spaces.Dict):
        return {"type": "Dict", "spaces": {k: describe_space(v, bounds) for k, v in space.spaces.items()}}
    if isinstance(space, gym.spaces.Tuple):
        return {"type": "Tuple", "spaces": [describe_space(v, bounds) for v in space.spaces]}
    return {"type": type(space).__name__}
