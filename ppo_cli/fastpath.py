"""The PPO loss of an MLP policy with its gradients written out by hand: the update's hot path.

On networks this small a minibatch step is bound by per-op overhead, not arithmetic: autograd records the
forward graph op by op and replays it backwards through generic kernels. The same loss and gradients written
as explicit matrix products need about half the ops and no graph. `FastLoss.build` returns None for anything
it does not cover (a shared trunk, MultiDiscrete/MultiBinary heads, clip_range_vf, a non-MLP module), and
`ppo.update` then uses autograd. tests/test_fastpath.py checks losses and every gradient against autograd.

The gradient of -min(r A, clip(r) A) with respect to r is -A where the unclipped term is the smaller (or they
are equal) and -A * [1-eps <= r <= 1+eps] elsewhere; autograd splits exact ties half and half between the two
branches, which gives the same total whenever it matters (a tie with r outside the clip range needs A = 0).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ppo_cli.policy import LOG_2PI, ActorCritic

_SLOPE = 0.01  # nn.LeakyReLU's default negative slope, which policy.mlp uses


def _linears(trunk: nn.Sequential, head: nn.Linear) -> list[nn.Linear]:
    return [m for m in trunk if isinstance(m, nn.Linear)] + [head]


class FastLoss:
    def __init__(self, policy: ActorCritic, activation: str) -> None:
        self.actor = _linears(policy.actor_trunk, policy.policy_head)
        self.critic = _linears(policy.critic_trunk, policy.value_head)
        self.activation = activation
        self.kind = policy.kind
        self.log_std = policy.log_std if policy.kind == "Box" else None
        self._one = torch.ones((), device=policy.value_head.weight.device)

    @classmethod
    def build(cls, policy: nn.Module, clip_range_vf: float | None) -> FastLoss | None:
        if not isinstance(policy, ActorCritic) or policy.shared_trunk or clip_range_vf is not None:
            return None
        if policy.kind not in ("Discrete", "Box"):
            return None
        kinds = {type(m) for m in policy.actor_trunk} | {type(m) for m in policy.critic_trunk}
        activation = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu"}
        acts = [activation[k] for k in kinds if k in activation]
        if len(acts) != 1 or not kinds <= {nn.Linear, *activation}:
            return None
        return cls(policy, acts[0])

    # --- the MLP, forward and backward ----------------------------------------------------------------
    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "tanh":
            return h.tanh_()
        if self.activation == "relu":
            return h.relu_()
        return torch.nn.functional.leaky_relu_(h, _SLOPE)

    def _act_grad(self, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """dL/d(pre-activation) from dL/d(output), using the output (sign and tanh are recoverable from it)."""
        if self.activation == "tanh":  # 1 - out^2 in one op
            return g.mul_(torch.addcmul(self._one, out, out, value=-1.0))
        if self.activation == "relu":
            return g.mul_(out > 0)
        return g.mul_(torch.where(out > 0, 1.0, _SLOPE))

    def _forward(self, layers: list[nn.Linear], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        inputs = [x]
        h = x
        for layer in layers[:-1]:
            h = self._act(torch.addmm(layer.bias, h, layer.weight.t()))
            inputs.append(h)
        return torch.addmm(layers[-1].bias, h, layers[-1].weight.t()), inputs

    def _backward(self, layers: list[nn.Linear], inputs: list[torch.Tensor], g: torch.Tensor) -> None:
        for i in range(len(layers) - 1, -1, -1):
            layer = layers[i]
            layer.weight.grad = g.t().mm(inputs[i])
            layer.bias.grad = g.sum(0)
            if i:
                g = self._act_grad(g.mm(layer.weight), inputs[i])

    # --- the loss ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def loss_and_grads(self, x: torch.Tensor, actions: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                       returns: torch.Tensor, clip_range: float, ent_coef: float, vf_coef: float,
                       normalize_advantage: bool) -> torch.Tensor:
        """Set .grad of every parameter to d(loss)/d(param); return [policy_loss, value_loss, entropy,
        approx_kl, clip_fraction], the same statistics as ppo.minibatch_loss."""
        n = x.shape[0]
        out, a_inputs = self._forward(self.actor, x)
        if normalize_advantage and n > 1:
            std, mean = torch.std_mean(adv)
            adv = (adv - mean) / (std + 1e-8)

        if self.kind == "Discrete":
            logp_all = torch.log_softmax(out, dim=-1)
            idx = actions.long().unsqueeze(-1)
            logp = logp_all.gather(-1, idx).squeeze(-1)
            p = logp_all.exp()
            entropy = -(p * logp_all).sum(-1)
        else:
            log_std = self.log_std
            inv_std = torch.exp(-log_std)
            z = (actions - out) * inv_std
            logp = (-0.5 * z * z).sum(-1) - (log_std.sum() + 0.5 * LOG_2PI * out.shape[1])
            entropy = (0.5 + 0.5 * LOG_2PI + log_std).sum().expand(n)

        log_ratio = logp - old_logp
        ratio = log_ratio.exp()
        surr1 = ratio * adv
        clipped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
        surr2 = clipped * adv
        policy_loss = -torch.minimum(surr1, surr2).mean()
        # d policy_loss / d logp = -(1/n) * r * A where the unclipped term counts, else 0 (see the module doc)
        counts = (surr1 <= surr2).logical_or_(clipped == ratio)
        g_logp = surr1.mul(counts).mul_(-1.0 / n)

        if self.kind == "Discrete":
            # d logp / d logits = onehot(a) - p;  d(-c mean H)/d logits = (c / n) p (log p + H)
            g_out = p * (ent_coef / n) * (logp_all + entropy.unsqueeze(-1)) - p * g_logp.unsqueeze(-1)
            g_out.scatter_add_(-1, idx, g_logp.unsqueeze(-1))
        else:
            g_logp_col = g_logp.unsqueeze(-1)
            g_out = g_logp_col * z * inv_std
            self.log_std.grad = (g_logp_col * (z * z - 1.0)).sum(0) - ent_coef
        self._backward(self.actor, a_inputs, g_out)
        del a_inputs, g_out  # the critic's pass runs after the actor's is freed: half the peak memory

        v_out, c_inputs = self._forward(self.critic, x)
        values = v_out.squeeze(-1)
        err = values - returns
        value_loss = (err * err).mean()
        self._backward(self.critic, c_inputs, (err * (2.0 * vf_coef / n)).unsqueeze(-1))

        ratio_m1 = ratio - 1.0
        approx_kl = (ratio_m1 - log_ratio).mean()
        clip_frac = (ratio_m1.abs() > clip_range).float().mean()
        return torch.stack([policy_loss, value_loss, entropy.mean(), approx_kl, clip_frac])



class NumpyActor:
    """The rollout's forward pass in numpy, on views of the policy's own parameters (CPU only).

    Acting on 8 observations is about 15 small ops; torch spends several microseconds of dispatch on each,
    numpy about one. The arrays are views of the parameters' memory, so they follow every in-place optimizer
    step without copying. Covers MLPs with separate trunks, Box observations without normalization, and
    Discrete or Box actions, with hidden layers up to MAX_WIDTH units; `build` returns None otherwise and the
    trainer acts through torch. Wider layers are bound by the matrix products, which torch does as fast, and
    numpy's own BLAS would then add its work buffers (about 30 MB) to the process for an 8% gain.
    """

    MAX_WIDTH = 128

    def __init__(self, policy: ActorCritic, activation: str) -> None:
        def arrays(layers: list[nn.Linear]) -> list[tuple[np.ndarray, np.ndarray]]:
            return [(layer.weight.detach().numpy().T, layer.bias.detach().numpy()) for layer in layers]

        self.actor = arrays(_linears(policy.actor_trunk, policy.policy_head))
        self.critic = arrays(_linears(policy.critic_trunk, policy.value_head))
        self.activation = activation
        self.kind = policy.kind
        self.log_std = policy.log_std.detach().numpy() if policy.kind == "Box" else None

    @classmethod
    def build(cls, policy: nn.Module) -> NumpyActor | None:
        fast = FastLoss.build(policy, None)
        if fast is None or policy.obs_norm is not None or policy.one_hot_obs:  # type: ignore[union-attr]
            return None
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in policy.parameters()):
            return None
        if max(layer.out_features for layer in _linears(policy.actor_trunk, policy.policy_head)) > cls.MAX_WIDTH:
            return None
        return cls(policy, fast.activation)  # type: ignore[arg-type]

    def _mlp(self, layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
        h = x
        for w, b in layers[:-1]:
            h = h @ w
            h += b
            if self.activation == "tanh":
                np.tanh(h, out=h)
            elif self.activation == "relu":
                np.maximum(h, 0.0, out=h)
            else:
                h = np.where(h > 0, h, np.float32(_SLOPE) * h)
        w, b = layers[-1]
        out = h @ w
        out += b
        return out

    def value(self, x: np.ndarray) -> np.ndarray:
        return self._mlp(self.critic, x)[:, 0]

    def act(self, x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sampled actions, their log-probs and the values, for a float32 batch [n, obs_dim]."""
        out = self._mlp(self.actor, x)
        n = out.shape[0]
        if self.kind == "Discrete":
            shifted = out - out.max(axis=1, keepdims=True)
            exp = np.exp(shifted)
            total = exp.sum(axis=1, keepdims=True)
            cdf = np.cumsum(exp / total, axis=1)
            # Inverse-CDF sampling; the min() guards against a cdf that rounds to just below 1.
            action = np.minimum((rng.random((n, 1), dtype=np.float32) > cdf).sum(axis=1), out.shape[1] - 1)
            logp = (shifted - np.log(total))[np.arange(n), action]
        else:
            noise = rng.standard_normal(out.shape, dtype=np.float32)
            action = out + noise * np.exp(self.log_std)
            logp = (-0.5 * noise * noise).sum(axis=1) - (self.log_std.sum() + np.float32(0.5 * LOG_2PI * out.shape[1]))
        return action, logp.astype(np.float32), self.value(x)
