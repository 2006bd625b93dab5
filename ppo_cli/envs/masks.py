"""Action masks: which actions an env allows in its current state, for Discrete and MultiDiscrete actions.

The env says so in one of the ways users already write it, looked for in this order (the first found wins):

1. observation: a Dict observation with an `action_mask` key (PettingZoo's and many game envs' convention);
2. info: `info["action_mask"]` from reset and step (rl_games' and many custom envs' convention);
3. method: an `action_masks()` method on the env, as sb3-contrib's MaskablePPO calls it.

A mask is one boolean per action: shape (n,) for Discrete(n), and for MultiDiscrete(nvec) the components' masks
concatenated, shape (sum(nvec),) (or (len(nvec), n) when every component has n choices). Integers 0/1 are
read as booleans. Each mask is checked when it arrives: a wrong shape or dtype, or a (component) mask with no
valid action, stops the run with one line naming the env and the step.

Masked logits are set to the float dtype's minimum (heads.py), so masked actions get probability 0 and no
gradient, and the entropy is over the valid actions only.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from ppo_cli.envs.spaces import MASK_KEY
from ppo_cli.errors import UserError

SOURCES = ("observation", "info", "method")


class ActionMasks:
    """Reads and checks the masks of a vector env's current observations (see the module doc)."""

    def __init__(self, source: str, nvec: list[int], label: str) -> None:
        self.source, self.nvec, self.label = source, nvec, label
        self.n_outputs = sum(nvec)

    @classmethod
    def detect(cls, envs: gym.vector.VectorEnv, obs_space: dict[str, Any], action_space: dict[str, Any],
               reset_info: dict[str, Any], label: str) -> ActionMasks | None:
        """The env's mask source, or None when it gives no masks."""
        source = None
        if obs_space["type"] == "Dict" and MASK_KEY in obs_space["spaces"]:
            source = "observation"
        elif MASK_KEY in reset_info:
            source = "info"
        elif _has_method(envs):
            source = "method"
        if source is None:
            return None
        kind = action_space["type"]
        if kind not in ("Discrete", "MultiDiscrete"):
            raise UserError(f"{label!r}: the env gives action masks ({source}), but masks apply to Discrete and "
                            f"MultiDiscrete actions only, not {kind}")
        nvec = [action_space["n"]] if kind == "Discrete" else list(action_space["nvec"])
        return cls(source, nvec, label)

    def __call__(self, obs: Any, info: dict[str, Any], envs: gym.vector.VectorEnv, step: int) -> np.ndarray:
        """The checked masks [num_envs, sum(nvec)] of the observations `obs` that came with `info`."""
        if self.source == "observation":
            raw = obs[MASK_KEY]
        elif self.source == "info":
            if MASK_KEY not in info:
                raise UserError(f"{self.label!r}: info['{MASK_KEY}'] is missing at step {step:,} (it was there at "
                                f"reset); give it with every reset and step")
            present = info.get(f"_{MASK_KEY}")
            if present is not None and not np.all(present):
                i = int(np.flatnonzero(~np.asarray(present))[0])
                raise UserError(f"{self.label!r}: env {i} gave no info['{MASK_KEY}'] at step {step:,}")
            raw = info[MASK_KEY]
        else:
            raw = np.stack(envs.call("action_masks"))
        return self.check(np.asarray(raw), step)

    def check(self, raw: np.ndarray, step: int) -> np.ndarray:
        n = raw.shape[0] if raw.ndim else 0
        if raw.ndim < 2 or raw[0].size != self.n_outputs:
            raise UserError(f"{self.label!r}: the action mask at step {step:,} has shape "
                            f"{tuple(raw.shape[1:]) if raw.ndim else ()} per env; expected ({self.n_outputs},) "
                            f"(one entry per action{', components concatenated' if len(self.nvec) > 1 else ''})")
        if raw.dtype != np.bool_:
            if raw.dtype.kind not in "iuf" or not np.isin(raw, (0, 1)).all():
                raise UserError(f"{self.label!r}: the action mask at step {step:,} must be booleans or 0/1, "
                                f"got {raw.dtype} values")
            raw = raw != 0
        mask = raw.reshape(n, self.n_outputs)
        start = 0
        for j, k in enumerate(self.nvec):
            empty = ~mask[:, start:start + k].any(axis=1)
            if empty.any():
                part = f" component {j}" if len(self.nvec) > 1 else ""
                raise UserError(f"{self.label!r}: the action mask of env {int(np.flatnonzero(empty)[0])}{part} at "
                                f"step {step:,} allows no action")
            start += k
        return mask


def _has_method(envs: gym.vector.VectorEnv) -> bool:
    try:
        envs.call("action_masks")
    except (AttributeError, NotImplementedError, TypeError):  # TypeError: a wrapper whose `call` is not a method
        return False
    return True
