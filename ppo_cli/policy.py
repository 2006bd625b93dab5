"""The actor-critic: MLP trunks, a categorical policy head and a value head, and their initialisation.

`act` is what the rollout calls (sample, log-prob, value; no graph), `evaluate` what the update calls
(log-prob of stored actions, entropy, value; with graph). The distribution maths is written out on plain
tensors instead of going through torch.distributions, whose per-call validation and object creation cost
more than the arithmetic on networks this small.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ppo_cli.config import choice

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}
HIDDEN_GAIN = math.sqrt(2.0)
POLICY_HEAD_GAIN = 0.01  # near-uniform initial policy: every action gets explored
VALUE_HEAD_GAIN = 1.0


def _init_hidden(layer: nn.Linear, scheme: str, activation: str, bias: float) -> None:
    if scheme == "orthogonal":
        nn.init.orthogonal_(layer.weight, gain=HIDDEN_GAIN)
    elif scheme == "xavier":
        nn.init.xavier_uniform_(layer.weight, gain=nn.init.calculate_gain(activation))
    elif scheme == "kaiming":
        nn.init.kaiming_uniform_(layer.weight, a=0.01 if activation == "leaky_relu" else 0.0,
                                 nonlinearity=activation)
    else:
        raise ValueError(f"unknown init scheme {scheme!r}")
    nn.init.constant_(layer.bias, bias)


def _init_head(layer: nn.Linear, gain: float, bias: float) -> None:
    # Heads are orthogonal whatever the hidden scheme: their gain, not the scheme, is what matters.
    nn.init.orthogonal_(layer.weight, gain=gain)
    nn.init.constant_(layer.bias, bias)


def mlp(in_dim: int, widths: list[int], activation: str, scheme: str, bias: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        linear = nn.Linear(in_dim, width)
        _init_hidden(linear, scheme, activation, bias)
        layers += [linear, ACTIVATIONS[activation]()]
        in_dim = width
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    """Categorical actor and state-value critic over flat (or one-hot) observations."""

    def __init__(self, obs_space: dict[str, Any], action_space: dict[str, Any], net_arch: list[int],
                 activation_fn: str = "tanh", init: str = "orthogonal", bias: float = 0.0,
                 shared_trunk: bool = False) -> None:
        super().__init__()
        self.obs_space, self.action_space = obs_space, action_space
        self.one_hot_obs = obs_space["type"] == "Discrete"
        in_dim = obs_space["n"] if self.one_hot_obs else math.prod(obs_space["shape"])
        n_actions = action_space["n"]
        widths = list(net_arch)
        self.shared_trunk = shared_trunk
        self.actor_trunk = mlp(in_dim, widths, activation_fn, init, bias)
        self.critic_trunk = self.actor_trunk if shared_trunk else mlp(in_dim, widths, activation_fn, init, bias)
        self.policy_head = nn.Linear(widths[-1], n_actions)
        self.value_head = nn.Linear(widths[-1], 1)
        _init_head(self.policy_head, POLICY_HEAD_GAIN, bias)
        _init_head(self.value_head, VALUE_HEAD_GAIN, bias)

    def actor_parameters(self) -> list[nn.Parameter]:
        """Trained at lr_actor. A shared trunk counts as actor: the policy is what PPO's clip protects."""
        return [*self.actor_trunk.parameters(), *self.policy_head.parameters()]

    def critic_parameters(self) -> list[nn.Parameter]:
        trunk = [] if self.shared_trunk else list(self.critic_trunk.parameters())
        return [*trunk, *self.value_head.parameters()]

    def preprocess(self, obs: torch.Tensor) -> torch.Tensor:
        if self.one_hot_obs:
            return F.one_hot(obs.long().view(-1), self.obs_space["n"]).float()
        return obs.float().flatten(1)

    def _heads(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(obs)
        h = self.actor_trunk(x)
        hv = h if self.shared_trunk else self.critic_trunk(x)
        return F.log_softmax(self.policy_head(h), dim=-1), self.value_head(hv).squeeze(-1)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, generator: torch.Generator | None = None,
            deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample actions for a batch of observations: (actions, log-probs, values)."""
        logp_all, value = self._heads(obs)
        if deterministic:
            action = logp_all.argmax(-1)
        else:
            action = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(-1)
        return action, logp_all.gather(-1, action.unsqueeze(-1)).squeeze(-1), value

    @torch.no_grad()
    def value(self, obs: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(obs)
        return self.value_head(self.critic_trunk(x)).squeeze(-1)

    def evaluate(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-prob of `actions`, entropy, value) under the current parameters, with autograd."""
        logp_all, value = self._heads(obs)
        logp = logp_all.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy, value


def build_policy(obs_space: dict[str, Any], action_space: dict[str, Any], network_cfg: Any) -> ActorCritic:
    return ActorCritic(obs_space, action_space, list(network_cfg.net_arch), choice(network_cfg.activation_fn),
                       choice(network_cfg.init), float(network_cfg.bias), bool(network_cfg.shared_trunk))
