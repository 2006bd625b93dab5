"""The actor-critic: MLP trunks, an action head for each supported action space, a value head, and their init.

`act` is what the rollout and evaluation call (sample or pick, log-prob, value; no graph), `evaluate` what
the update calls (log-prob of stored actions, entropy, value; with graph). Both take *features*: the
observation after `features()` (one-hot for Discrete, flattened, normalized when env.normalize_obs is on),
which the rollout stores so the update sees exactly the input the old policy saw. The distribution maths is
written out on plain tensors instead of going through torch.distributions, whose per-call validation and
object creation cost more than the arithmetic on networks this small.

Action heads, by action space:
- Discrete(n): categorical over n logits.
- MultiDiscrete(nvec): one categorical per component; log-probs and entropies add up.
- MultiBinary(n): one Bernoulli per bit.
- Box: diagonal Gaussian, mean from the network, state-independent learnable log-std starting at
  network.log_std_init. Samples are unbounded; `env_action` clips them to the bounds only on the way to
  the env, so the stored action is the sample and its log-prob is exact.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ppo_cli.config import choice
from ppo_cli.normalize import ObsNormalizer

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


LOG_2PI = math.log(2.0 * math.pi)


def action_layout(space: dict[str, Any]) -> tuple[int, tuple[int, ...], torch.dtype]:
    """(head outputs, stored action shape, stored action dtype) for a described action space."""
    kind = space["type"]
    if kind == "Discrete":
        return space["n"], (), torch.long
    if kind == "MultiDiscrete":
        return sum(space["nvec"]), (len(space["nvec"]),), torch.long
    if kind == "MultiBinary":
        return math.prod(space["shape"]), (math.prod(space["shape"]),), torch.float32
    if kind == "Box":
        return math.prod(space["shape"]), (math.prod(space["shape"]),), torch.float32
    raise ValueError(f"unsupported action space {kind}")


def observation_dim(space: dict[str, Any]) -> int:
    return space["n"] if space["type"] == "Discrete" else math.prod(space["shape"])


class ActorCritic(nn.Module):
    """Actor and state-value critic over flat (or one-hot) observations."""

    def __init__(self, obs_space: dict[str, Any], action_space: dict[str, Any], net_arch: list[int],
                 activation_fn: str = "tanh", init: str = "orthogonal", bias: float = 0.0,
                 shared_trunk: bool = False, log_std_init: float = 0.0, normalize_obs: bool = False,
                 clip_obs: float = 10.0) -> None:
        super().__init__()
        self.obs_space, self.action_space = obs_space, action_space
        self.one_hot_obs = obs_space["type"] == "Discrete"
        in_dim = observation_dim(obs_space)
        self.kind = action_space["type"]
        n_out, self.action_shape, self.action_dtype = action_layout(action_space)
        widths = list(net_arch)
        self.shared_trunk = shared_trunk
        # One-hot inputs are already on a fixed scale; normalizing them would only add noise.
        self.obs_norm = ObsNormalizer(in_dim, clip_obs) if normalize_obs and not self.one_hot_obs else None
        self.actor_trunk = mlp(in_dim, widths, activation_fn, init, bias)
        self.critic_trunk = self.actor_trunk if shared_trunk else mlp(in_dim, widths, activation_fn, init, bias)
        self.policy_head = nn.Linear(widths[-1], n_out)
        self.value_head = nn.Linear(widths[-1], 1)
        _init_head(self.policy_head, POLICY_HEAD_GAIN, bias)
        _init_head(self.value_head, VALUE_HEAD_GAIN, bias)
        if self.kind == "Box":
            self.log_std = nn.Parameter(torch.full((n_out,), float(log_std_init)))
            low = torch.as_tensor(action_space["low"], dtype=torch.float32).flatten()
            high = torch.as_tensor(action_space["high"], dtype=torch.float32).flatten()
            self._low, self._high = low.numpy(), high.numpy()
        if self.kind == "MultiDiscrete":
            self.nvec = [int(n) for n in action_space["nvec"]]

    def actor_parameters(self) -> list[nn.Parameter]:
        """Trained at lr_actor. A shared trunk counts as actor: the policy is what PPO's clip protects."""
        extra = [self.log_std] if self.kind == "Box" else []
        return [*self.actor_trunk.parameters(), *self.policy_head.parameters(), *extra]

    def critic_parameters(self) -> list[nn.Parameter]:
        trunk = [] if self.shared_trunk else list(self.critic_trunk.parameters())
        return [*trunk, *self.value_head.parameters()]

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        """Network input for raw observations: one-hot or flattened, then normalized with the frozen stats."""
        if self.one_hot_obs:
            return F.one_hot(obs.long().view(-1) - self.obs_space.get("start", 0), self.obs_space["n"]).float()
        x = obs.float().flatten(1)
        return x if self.obs_norm is None else self.obs_norm(x)

    def update_obs_stats(self, obs: torch.Tensor) -> None:
        """Fold a batch of raw observations into the normalization statistics (training rollouts only)."""
        if self.obs_norm is not None:
            self.obs_norm.update(obs.float().flatten(1))

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.actor_trunk(x)
        hv = h if self.shared_trunk else self.critic_trunk(x)
        return self.policy_head(h), self.value_head(hv).squeeze(-1)

    # --- the distribution of each head, on plain tensors ---------------------------------------------------
    def _logp_entropy(self, out: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "Discrete":
            logp_all = F.log_softmax(out, dim=-1)
            logp = logp_all.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
            return logp, -(logp_all.exp() * logp_all).sum(-1)
        if self.kind == "Box":
            std_inv = torch.exp(-self.log_std)
            z = (actions - out) * std_inv
            logp = (-0.5 * z.square() - self.log_std - 0.5 * LOG_2PI).sum(-1)
            entropy = (0.5 + 0.5 * LOG_2PI + self.log_std).sum().expand(out.shape[0])
            return logp, entropy
        if self.kind == "MultiBinary":
            log_p1, log_p0 = F.logsigmoid(out), F.logsigmoid(-out)
            logp = (actions * log_p1 + (1.0 - actions) * log_p0).sum(-1)
            return logp, -(log_p1.exp() * log_p1 + log_p0.exp() * log_p0).sum(-1)
        logp = torch.zeros(out.shape[0], device=out.device)
        entropy = torch.zeros(out.shape[0], device=out.device)
        for i, logits in enumerate(out.split(self.nvec, dim=-1)):
            logp_all = F.log_softmax(logits, dim=-1)
            logp = logp + logp_all.gather(-1, actions[:, i:i + 1].long()).squeeze(-1)
            entropy = entropy - (logp_all.exp() * logp_all).sum(-1)
        return logp, entropy

    def _pick(self, out: torch.Tensor, generator: torch.Generator | None, deterministic: bool) -> torch.Tensor:
        if self.kind == "Discrete":
            if deterministic:
                return out.argmax(-1)
            return torch.multinomial(F.softmax(out, dim=-1), 1, generator=generator).squeeze(-1)
        if self.kind == "Box":
            if deterministic:
                return out
            noise = torch.randn(out.shape, generator=generator, device=out.device)
            return out + noise * self.log_std.exp()
        if self.kind == "MultiBinary":
            if deterministic:
                return (out > 0).float()
            return torch.bernoulli(torch.sigmoid(out), generator=generator)
        parts = []
        for logits in out.split(self.nvec, dim=-1):
            if deterministic:
                parts.append(logits.argmax(-1))
            else:
                parts.append(torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1))
        return torch.stack(parts, dim=-1)

    # --- what the rollout, the update and evaluation call --------------------------------------------------
    @torch.no_grad()
    def act_features(self, x: torch.Tensor, generator: torch.Generator | None = None,
                     deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(actions, log-probs, values) for a batch of features."""
        out, value = self._forward(x)
        action = self._pick(out, generator, deterministic)
        logp, _ = self._logp_entropy(out, action)
        return action, logp, value

    @torch.no_grad()
    def act(self, obs: torch.Tensor, generator: torch.Generator | None = None,
            deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(actions, log-probs, values) for a batch of raw observations."""
        return self.act_features(self.features(obs), generator, deterministic)

    @torch.no_grad()
    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """V of a batch of raw observations."""
        return self.value_head(self.critic_trunk(self.features(obs))).squeeze(-1)

    def evaluate(self, x: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-prob of `actions`, entropy, value) for a batch of features, with autograd."""
        out, value = self._forward(x)
        logp, entropy = self._logp_entropy(out, actions)
        return logp, entropy, value

    def env_action(self, action: torch.Tensor | np.ndarray) -> np.ndarray:
        """The stored action as the env takes it: Box samples clipped to the bounds and reshaped.

        Takes the torch rollout's tensors and the numpy rollout's arrays alike."""
        a = action if isinstance(action, np.ndarray) else action.cpu().numpy()
        if self.kind == "Box":
            return np.clip(a, self._low, self._high).reshape(a.shape[0], *self.action_space["shape"])
        if self.kind == "MultiBinary":
            return a.astype(np.int8).reshape(a.shape[0], *self.action_space["shape"])
        if self.kind == "MultiDiscrete":
            return (a + np.asarray(self.action_space["start"])).reshape(a.shape[0], *self.action_space["shape"])
        return a + self.action_space.get("start", 0)


def build_policy(obs_space: dict[str, Any], action_space: dict[str, Any], cfg: Any) -> ActorCritic:
    """The policy a run config describes (network group, plus env.normalize_obs / env.clip_obs)."""
    n, e = cfg.network, cfg.env
    return ActorCritic(obs_space, action_space, list(n.net_arch), choice(n.activation_fn), choice(n.init),
                       float(n.bias), bool(n.shared_trunk), float(n.log_std_init), bool(e.normalize_obs),
                       float(e.clip_obs))
