"""env.backend=envpool: envpool's C++ vector envs behind the interface of gymnasium's vector env."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig

from ppo_cli.errors import UserError


def make_vec_env(env_cfg: DictConfig, seed: int, num_envs: int, render_mode: str | None,
                 wrappers: Sequence[Callable[[Any], Any]], training: bool) -> Any:
    raise UserError("env.backend=envpool is not available yet; use env.backend=gymnasium")
