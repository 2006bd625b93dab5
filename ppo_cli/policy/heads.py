"""Action heads: one class per action distribution, each owning its sampling, log-prob, entropy, mode and the
mapping of a stored action to what the env takes. The fast path's numpy twins are in algo/fast/heads.py.

A head reads the policy network's raw outputs `out` [n, n_outputs] (logits, or a Gaussian's mean) and holds
any parameters of its own (the Gaussian's state-independent log-std). The maths is written on plain tensors
instead of going through torch.distributions, whose per-call validation and object creation cost more than
the arithmetic on networks this small.

Sampling draws its randomness from a numpy Generator (`noise`, then a deterministic function of it), which the
numpy twin draws from too, so the torch and the numpy rollout take the same actions from the same seed.

Adding a head: a subclass here, registered in HEADS under the name `envs.describe_space` gives its space.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2.0 * math.pi)


class ActionHead(nn.Module):
    """The interface every head implements (see the module doc)."""

    n_outputs: int  # network outputs the head reads
    action_shape: tuple[int, ...]  # one stored action
    action_dtype: torch.dtype

    def __init__(self, space: dict[str, Any]) -> None:
        super().__init__()
        self.space = space

    # --- torch ---------------------------------------------------------------------------------------------
    # `mask` (bool [n, n_outputs], masks.py) is given only to heads that take masks (`maskable`), else None.
    maskable: ClassVar[bool] = False

    def log_prob_entropy(self, out: torch.Tensor, actions: torch.Tensor,
                         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def noise(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """The randomness of n samples, drawn once for both twins."""
        raise NotImplementedError

    def sample(self, out: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def mode(self, out: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    # --- shared --------------------------------------------------------------------------------------------
    def own_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def env_action(self, actions: np.ndarray) -> np.ndarray:
        """A batch of stored actions as the env takes them."""
        raise NotImplementedError

    def env_action_torch(self, actions: torch.Tensor) -> torch.Tensor:
        """`env_action` in torch ops, for graphs that end at the env action (export.py): traceable, its
        constants taken from the space."""
        raise NotImplementedError

    def log_scalars(self) -> dict[str, float]:
        """What TensorBoard shows about the head itself (charts/...)."""
        return {}


class MultiCategorical(ActionHead):
    """MultiDiscrete(nvec): one categorical per component over its slice of the logits; log-probs and entropies
    add up. Categorical is the one-component case. A mask sets the logits of forbidden actions to the dtype's
    minimum: probability 0, no gradient, no share of the entropy."""

    maskable = True

    def __init__(self, space: dict[str, Any]) -> None:
        super().__init__(space)
        self.nvec = [int(n) for n in space["nvec"]]
        self.n_outputs, self.action_shape, self.action_dtype = sum(self.nvec), (len(self.nvec),), torch.long

    def _segments(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (out,) if len(self.nvec) == 1 else out.split(self.nvec, dim=-1)

    def _columns(self, actions: torch.Tensor) -> torch.Tensor:
        return actions.long()

    @staticmethod
    def _masked(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return out if mask is None else torch.where(mask, out, torch.finfo(out.dtype).min)

    def log_prob_entropy(self, out: torch.Tensor, actions: torch.Tensor,
                         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._masked(out, mask)
        cols = self._columns(actions)
        logp = entropy = None
        for i, logits in enumerate(self._segments(out)):
            logp_all = F.log_softmax(logits, dim=-1)
            lp = logp_all.gather(-1, cols[:, i:i + 1]).squeeze(-1)
            h = -(logp_all.exp() * logp_all).sum(-1)
            logp, entropy = (lp, h) if logp is None else (logp + lp, entropy + h)
        return logp, entropy  # type: ignore[return-value]

    def noise(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.random((n, len(self.nvec)), dtype=np.float32)

    def sample(self, out: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # Inverse-CDF sampling. The clamp to the last allowed action guards against a cdf that rounds to just below
        # 1; the one to the first allowed action against a noise of exactly 0.0 (one draw in 2^24), which no masked
        # leading action's cdf of 0 is below.
        out = self._masked(out, mask)
        masks = self._segments(mask) if mask is not None else [None] * len(self.nvec)
        parts = []
        for i, (logits, m) in enumerate(zip(self._segments(out), masks, strict=True)):
            drawn = (noise[:, i:i + 1] > F.softmax(logits, dim=-1).cumsum(-1)).sum(-1)
            if m is None:
                parts.append(drawn.clamp(max=logits.shape[-1] - 1))
            else:
                first, last = m.long().argmax(-1), logits.shape[-1] - 1 - m.flip(-1).long().argmax(-1)
                parts.append(torch.minimum(torch.maximum(drawn, first), last))
        return self._stack(parts)

    def _stack(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(parts, dim=-1)

    def mode(self, out: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._stack([logits.argmax(-1) for logits in self._segments(self._masked(out, mask))])

    def env_action(self, actions: np.ndarray) -> np.ndarray:
        return (actions + np.asarray(self.space["start"])).reshape(actions.shape[0], *self.space["shape"])

    def env_action_torch(self, actions: torch.Tensor) -> torch.Tensor:
        start = torch.as_tensor(self.space["start"], dtype=torch.int64)
        return (actions + start).reshape(-1, *self.space["shape"])


class Categorical(MultiCategorical):
    """Discrete(n): a categorical over n logits; actions are stored as scalars."""

    def __init__(self, space: dict[str, Any]) -> None:
        super().__init__({**space, "nvec": [space["n"]]})
        self.action_shape = ()

    def _columns(self, actions: torch.Tensor) -> torch.Tensor:
        return actions.long().unsqueeze(-1)

    def _stack(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0]

    def env_action(self, actions: np.ndarray) -> np.ndarray:
        return actions + self.space.get("start", 0)

    def env_action_torch(self, actions: torch.Tensor) -> torch.Tensor:
        start = int(self.space.get("start", 0))
        return actions + start if start else actions


class Bernoulli(ActionHead):
    """MultiBinary: one Bernoulli per bit, its logit from the network."""

    def __init__(self, space: dict[str, Any]) -> None:
        super().__init__(space)
        self.n_outputs = math.prod(space["shape"])
        self.action_shape, self.action_dtype = (self.n_outputs,), torch.float32

    def log_prob_entropy(self, out: torch.Tensor, actions: torch.Tensor,
                         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        log_p1, log_p0 = F.logsigmoid(out), F.logsigmoid(-out)
        logp = (actions * log_p1 + (1.0 - actions) * log_p0).sum(-1)
        return logp, -(log_p1.exp() * log_p1 + log_p0.exp() * log_p0).sum(-1)

    def noise(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.random((n, self.n_outputs), dtype=np.float32)

    def sample(self, out: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return (noise < torch.sigmoid(out)).float()

    def mode(self, out: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return (out > 0).float()

    def env_action(self, actions: np.ndarray) -> np.ndarray:
        return actions.astype(np.int8).reshape(actions.shape[0], *self.space["shape"])

    def env_action_torch(self, actions: torch.Tensor) -> torch.Tensor:
        return actions.to(torch.int8).reshape(-1, *self.space["shape"])


class DiagGaussian(ActionHead):
    """Box: a diagonal Gaussian, its mean from the network and a state-independent learnable log-std starting at
    network.log_std_init. Samples are unbounded; `env_action` clips them to the bounds only on the way to the
    env, so the stored action is the sample and its log-prob is exact."""

    def __init__(self, space: dict[str, Any], log_std_init: float = 0.0) -> None:
        super().__init__(space)
        self.n_outputs = math.prod(space["shape"])
        self.action_shape, self.action_dtype = (self.n_outputs,), torch.float32
        self.log_std = nn.Parameter(torch.full((self.n_outputs,), float(log_std_init)))
        # Clipped in float64 against the exact bounds, then cast to the space's dtype: clipping in float32 could
        # land just outside a float64 bound (0.10000000149 for 0.1), which envs checking space.contains refuse.
        self._low = np.asarray(space["low"], dtype=np.float64).flatten()
        self._high = np.asarray(space["high"], dtype=np.float64).flatten()
        self._dtype = np.dtype(space.get("dtype", "float32"))

    def log_prob_entropy(self, out: torch.Tensor, actions: torch.Tensor,
                         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z = (actions - out) * torch.exp(-self.log_std)
        logp = (-0.5 * z.square() - self.log_std - 0.5 * LOG_2PI).sum(-1)
        entropy = (0.5 + 0.5 * LOG_2PI + self.log_std).sum().expand(out.shape[0])
        return logp, entropy

    def noise(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.standard_normal((n, self.n_outputs), dtype=np.float32)

    def sample(self, out: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return out + noise * self.log_std.exp()

    def mode(self, out: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return out

    def env_action(self, actions: np.ndarray) -> np.ndarray:
        clipped = np.clip(actions.astype(np.float64), self._low, self._high).astype(self._dtype)
        return clipped.reshape(actions.shape[0], *self.space["shape"])

    def env_action_torch(self, actions: torch.Tensor) -> torch.Tensor:
        # np.clip(a, low, high) is minimum(maximum(a, low), high), in float64 as env_action does
        low, high = torch.from_numpy(self._low.copy()), torch.from_numpy(self._high.copy())
        clipped = torch.minimum(torch.maximum(actions.double(), low), high)
        return clipped.to(getattr(torch, self._dtype.name)).reshape(-1, *self.space["shape"])

    def log_scalars(self) -> dict[str, float]:
        return {"charts/action_std": float(self.log_std.detach().exp().mean())}


# Keyed by envs.describe_space's "type"; the spaces envs.check_spaces accepts.
HEADS: dict[str, type[ActionHead]] = {"Discrete": Categorical, "MultiDiscrete": MultiCategorical,
                                      "MultiBinary": Bernoulli, "Box": DiagGaussian}


def build_head(space: dict[str, Any], log_std_init: float = 0.0) -> ActionHead:
    cls = HEADS.get(space["type"])
    if cls is None:
        raise ValueError(f"unsupported action space {space['type']}")
    return cls(space, log_std_init) if cls is DiagGaussian else cls(space)
