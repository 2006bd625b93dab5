"""One policy per agent group (network.share=false): agents named adversary_0, adversary_1 and agent_0 form the
groups "adversary" and "agent" (envs/agents.py), and each group gets an ActorCritic of its own.

Every other stage sees one policy: the rollout stores one network input per row, the update one loss. The input is
each group's own input side by side, then the row's group index:

    x = [ x_adversary | x_agent | group ]

Group g's ActorCritic reads its own slice: its own keys of the observation where the groups' spaces differ
("adversary/obs"), plus the agent id and the global state as its algorithm says, normalized with its own
statistics, which only its own rows update. Every group's network runs on every row and each row keeps its own
group's outputs (torch.where): a row's loss then reaches its own group's parameters alone, and the shapes stay
static (compile, CUDA graphs). For the two or three small MLPs of MPE-sized tasks that costs less than gathering
rows would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ppo_cli.envs.agents import GROUP, RESERVED
from ppo_cli.envs.spaces import MASK_KEY, space_items
from ppo_cli.errors import UserError


@dataclass
class GroupsLayout:
    """What the rollout storage asks of a policy's input layout (observations.InputLayout), for the joined input."""

    dim: int
    stored_dtype: torch.dtype = torch.float32
    stored_channels_last: bool = False
    image_part: Any = None
    image: Any = None

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return (self.dim,)


def group_keys(obs_space: dict[str, Any]) -> dict[str, list[str]]:
    """The own keys of each group ("adversary/obs" -> adversary), where a PettingZoo env's groups see different
    spaces (envs/agents.py): its rows have a `group` one-hot of one entry per group, and every other key but the
    ones ppo-cli adds (and a shared action mask) starts with a group's name and "/". Else {}: a "/" in a key of
    any other observation means nothing here."""
    spaces = dict(space_items(obs_space)) if obs_space["type"] == "Dict" else {}
    if GROUP not in spaces:
        return {}
    keys: dict[str, list[str]] = {}
    for key in spaces:
        if key in RESERVED or key == MASK_KEY:
            continue
        if not isinstance(key, str) or "/" not in key:
            return {}
        keys.setdefault(key.split("/", 1)[0], []).append(key)
    return keys if len(keys) == int(spaces[GROUP]["shape"][0]) else {}


def check_shared(obs_space: dict[str, Any]) -> None:
    """One line where the agents' observation spaces differ by group but one policy is shared by all of them."""
    groups = group_keys(obs_space)
    if groups:
        spaces = dict(space_items(obs_space))
        shown = ", ".join(f"{g}: {', '.join(_shape(spaces[k]) for k in keys)}" for g, keys in groups.items())
        raise UserError(f"the agents' observation spaces differ by group ({shown}); one policy shared by all agents "
                        f"(network.share=true) needs one observation space: set network.share=false for a policy "
                        f"per group")


def _shape(space: dict[str, Any]) -> str:
    return f"{space['type']}{tuple(space['shape'])}" if "shape" in space else space["type"]


class GroupedActorCritic(nn.Module):
    """An ActorCritic per agent group behind the one policy interface the rollout, update and evaluation call
    (see the module doc)."""

    def __init__(self, obs_space: dict[str, Any], build: Callable[[tuple[str, ...]], Any]) -> None:
        # `build(more_skip)`: an ActorCritic (actor_critic.build_policy's) that also leaves out the keys more_skip
        super().__init__()
        spaces = dict(space_items(obs_space))
        self.n_groups = int(spaces[GROUP]["shape"][0]) if GROUP in spaces else 1
        own = group_keys(obs_space)
        names = sorted(own)
        # Group g reads its own keys, never the others' (nor the group index, which routes its rows: agent_keys
        # leaves it out of every network).
        self.members = nn.ModuleList(
            build(tuple(k for h in names if h != names[g] for k in own[h])) for g in range(self.n_groups))
        for m in self.members:
            if m.layout.image is not None or m.actor_core is not None:
                raise UserError("network.share=false (a policy per agent group) is built for MLP policies without "
                                "a recurrent core; image observations and network.recurrent need network.share=true")
        bounds = np.cumsum([0, *(m.layout.dim for m in self.members)])
        self.slices = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        self.layout = GroupsLayout(int(bounds[-1]) + 1)
        first = self.members[0]
        self.obs_space, self.action_space = obs_space, first.action_space
        self.action_shape, self.action_dtype = first.action_shape, first.action_dtype
        self.obs_norm = None  # each member normalizes its own slice
        self.recurrent, self.actor_core, self.state_size = None, None, 0
        self.shared_trunk = first.shared_trunk
        # What an export takes (policy/export.py): the keys some group reads, and the group index that routes rows.
        self.skip_keys = tuple(k for k in first.skip_keys if k != GROUP and all(k in m.skip_keys for m in self.members))
        self.critic_keys = first.critic_keys

    @property
    def dist(self) -> Any:
        # The groups' heads are alike (one action space): noise, env actions and log-std scalars read the first's.
        return self.members[0].dist

    def set_precision(self, precision: str) -> None:
        for m in self.members:
            m.set_precision(precision)

    def actor_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.members for p in m.actor_parameters()]

    def critic_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.members for p in m.critic_parameters()]

    def initial_state(self, n: int, device: torch.device | str = "cpu") -> None:
        return None

    # --- input ----------------------------------------------------------------------------------------------
    def _group(self, obs: Any) -> torch.Tensor:
        first = next(iter(obs.values()))
        if self.n_groups == 1:
            return torch.zeros(first.shape[0], dtype=torch.long, device=first.device)
        return torch.as_tensor(obs[GROUP]).argmax(-1)

    def prepare(self, obs: Any) -> torch.Tensor:
        xs = [m.prepare(obs) for m in self.members]
        return torch.cat([*xs, self._group(obs).to(xs[0].dtype).unsqueeze(-1)], dim=-1)

    def update_obs_stats(self, obs: Any) -> None:
        group = self._group(obs)
        for g, m in enumerate(self.members):
            rows = group == g
            if m.obs_norm is not None and bool(rows.any()):
                m.update_obs_stats({k: v[rows] for k, v in obs.items()})

    def _split(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return [x[..., a:b] for a, b in self.slices], x[..., -1].long()

    @staticmethod
    def _pick(group: torch.Tensor, outs: list[Any]) -> Any:
        """Each row's own group's value of each output (outs: one tuple per group)."""
        picked = list(outs[0])
        for g, out in enumerate(outs[1:], start=1):
            for i, value in enumerate(out):
                if value is None:
                    continue
                rows = (group == g).reshape(-1, *([1] * (value.dim() - 1)))
                picked[i] = torch.where(rows, value, picked[i])
        return tuple(picked)

    # --- what the rollout, the update and evaluation call (ActorCritic's methods, per group) ----------------
    def step(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, None]:
        xs, group = self._split(x)
        return self._pick(group, [m.step(xg) for m, xg in zip(self.members, xs, strict=True)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step(x)[:2]

    @torch.no_grad()
    def act_step(self, x: torch.Tensor, state: torch.Tensor | None, rng: np.random.Generator | None = None,
                 deterministic: bool = False, mask: torch.Tensor | None = None) -> tuple[Any, ...]:
        if deterministic or rng is None:
            xs, group = self._split(x)
            return self._pick(group, [m.act_step(xg, None, None, True, mask)
                                      for m, xg in zip(self.members, xs, strict=True)])
        noise = torch.from_numpy(self.dist.noise(rng, x.shape[0])).to(x.device)
        return self.sample_step(x, state, noise, mask)

    @torch.no_grad()
    def sample_step(self, x: torch.Tensor, state: torch.Tensor | None, noise: torch.Tensor,
                    mask: torch.Tensor | None = None) -> tuple[Any, ...]:
        xs, group = self._split(x)
        return self._pick(group, [m.sample_step(xg, None, noise, mask) for m, xg in zip(self.members, xs, strict=True)])

    def act(self, x: torch.Tensor, rng: np.random.Generator | None = None, deterministic: bool = False,
            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.act_step(x, None, rng, deterministic, mask)[:3]

    @torch.no_grad()
    def value(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        return self.step(x)[1]

    def evaluate(self, x: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor | None = None,
                 starts: torch.Tensor | None = None, states: torch.Tensor | None = None,
                 seq_len: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, group = self._split(x)
        return self._pick(group, [m.evaluate(xg, actions, mask) for m, xg in zip(self.members, xs, strict=True)])

    def env_action(self, action: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.members[0].env_action(action)
