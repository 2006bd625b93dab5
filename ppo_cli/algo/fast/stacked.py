"""The members of a batched run (algo/batched.py) on the numpy fast path: each member's policy keeps its own
parameters, optimizer and checkpoint format, but their memory is one [members, total] tensor (and their gradients
another), so one numpy operation on a stacked view computes a layer of every member.

Member k's slice of every operation is what the single run of member k computes: the same BLAS call on the same
numbers (numpy's matmul runs a stack of matrices one gemm per matrix), the same reductions per member (core._dot,
core._total). tests/test_batched.py checks a member against its single run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ppo_cli.algo.fast.core import NumpyLoss, NumpyMLP, _networks
from ppo_cli.algo.fast.heads import NumpyDiagGaussian, NumpyHead, numpy_head
from ppo_cli.policy.actor_critic import ActorCritic


class StackedParameters:
    """Every member's parameters re-pointed (`.data`) at views of one [members, total] float32 tensor, and their
    .grad at views of another. The optimizers keep the same Parameter objects, so each member's optimizer and
    state_dict are what its single run's would be."""

    def __init__(self, policies: list[ActorCritic]) -> None:
        params = [list(p.parameters()) for p in policies]
        members, total = len(params), sum(p.numel() for p in params[0])
        self.data = torch.empty(members, total)
        self.grad = torch.zeros(members, total)
        self.where: dict[int, tuple[int, tuple[int, ...]]] = {}  # id(member 0's parameter) -> (offset, shape)
        for k, plist in enumerate(params):
            offset = 0
            for p in plist:
                n = p.numel()
                view = self.data[k, offset:offset + n].view_as(p)
                view.copy_(p.data)
                p.data = view
                p.grad = self.grad[k, offset:offset + n].view_as(p)
                if k == 0:
                    self.where[id(p)] = (offset, tuple(p.shape))
                offset += n
        self._data, self._grad = self.data.numpy(), self.grad.numpy()
        self.members = members

    def _stacked(self, flat: np.ndarray, param: torch.Tensor) -> np.ndarray:
        offset, shape = self.where[id(param)]
        view = flat[:, offset:offset + int(np.prod(shape, dtype=np.int64))].reshape(self.members, *shape)
        if not np.shares_memory(view, flat):  # reshape copies where it cannot view; a copy would be stale
            raise AssertionError("a stacked parameter view is a copy")
        return view

    def value(self, param: torch.Tensor) -> np.ndarray:
        """[members, *shape]: `param` (member 0's) of every member."""
        return self._stacked(self._data, param)

    def gradient(self, param: torch.Tensor) -> np.ndarray:
        return self._stacked(self._grad, param)

    def mlp(self, net: NumpyMLP) -> NumpyMLP:
        """`net` (on member 0's layers) for every member at once."""
        return NumpyMLP(net.layers, net.activation, net.activate_last,
                        [self.value(layer.weight) for layer in net.layers],
                        [self.value(layer.bias)[:, None, :] for layer in net.layers])

    def networks(self, policy: ActorCritic, activation: str) -> tuple[NumpyMLP | None, NumpyMLP, NumpyMLP]:
        return tuple(None if net is None else self.mlp(net)  # type: ignore[return-value]
                     for net in _networks(policy, activation))

    def head(self, policy: ActorCritic) -> NumpyHead:
        head = numpy_head(policy.dist)
        if isinstance(head, NumpyDiagGaussian):
            return NumpyDiagGaussian(policy.dist, self.value(policy.dist.log_std)[:, None, :])  # type: ignore[arg-type]
        assert head is not None and not head.per_member, "a head with parameters needs its stacked twin here"
        return head

    def loss(self, policy: ActorCritic, activation: str) -> NumpyLoss:
        """NumpyLoss on every member at once, its gradients written into the stacked .grad memory."""
        loss = NumpyLoss.__new__(NumpyLoss)
        loss.trunk, loss.actor, loss.critic = self.networks(policy, activation)
        loss.dist, loss.head = policy.dist, self.head(policy)
        loss.flat_grad = self._grad
        loss.grads = {name: [(self.gradient(m.weight), self.gradient(m.bias)) for m in net.layers]
                      for name, net in loss._networks().items() if net is not None}
        loss.dist_grads = [self.gradient(p) for p in policy.dist.own_parameters()]
        loss.lead, loss._buffers = (self.members,), {}
        return loss

    def clip(self, max_norm: np.ndarray, active: np.ndarray) -> np.ndarray:
        """core.clip_flat_grad for each active member's gradients; the norms before clipping (0 where inactive)."""
        norms = np.zeros(self.members)
        for k in np.flatnonzero(active):
            flat = self._grad[k]
            norm = float(np.sqrt(np.dot(flat, flat)))
            coef = float(max_norm[k]) / (norm + 1e-6)
            if coef < 1.0:
                flat *= np.float32(coef)
            norms[k] = norm
        return norms


class StackedAdamStep:
    """update.FusedAdamStep for the members' optimizers together: one call of the fused kernel for all the
    parameter groups (of all active members) that share their settings, each member's state its own.

    Each parameter's step count (Adam's state["step"], a float32 scalar) becomes an element of one [members,
    parameters] tensor, so counting a step is one add for the batch, not a foreach over every member's tensors
    (which costs more than the kernel on small networks); a member's state_dict still holds a count per parameter.
    """

    def __init__(self, steps: list[Any]) -> None:
        self.steps = steps  # FusedAdamStep per member
        for step in steps:
            step._create_state()
            step.groups = step._state_lists()
        counts = [[c for _, (_, _, _, cs) in step.groups for c in cs] for step in steps]
        self.counts = torch.tensor([[float(c) for c in member] for member in counts], dtype=torch.float32)
        for k, step in enumerate(steps):
            j = 0
            for _, (params, _, _, cs) in step.groups:
                for i, p in enumerate(params):
                    view = self.counts[k, j]
                    step.optimizer.state[p]["step"] = view
                    cs[i] = view
                    j += 1
        self._buckets: tuple[Any, list] | None = None

    def _bucket(self, active: np.ndarray) -> list:
        key = (active.tobytes(), tuple(g["lr"] for s in self.steps for g in s.optimizer.param_groups))
        if self._buckets is not None and self._buckets[0] == key:
            return self._buckets[1]
        buckets: dict[tuple, list[list[torch.Tensor]]] = {}
        for k in np.flatnonzero(active):
            step = self.steps[k]
            decoupled = isinstance(step.optimizer, torch.optim.AdamW)
            for group, (params, exp_avgs, exp_avg_sqs, counts) in step.groups:
                kind = decoupled or bool(group.get("decoupled_weight_decay"))
                setting = (group["lr"], *group["betas"], group["weight_decay"], group["eps"], kind)
                lists = buckets.setdefault(setting, [[], [], [], [], []])
                for target, items in zip(lists, (params, [p.grad for p in params], exp_avgs, exp_avg_sqs, counts),
                                         strict=True):
                    target.extend(items)
        self._buckets = (key, list(buckets.items()))
        return self._buckets[1]

    def __call__(self, active: np.ndarray) -> None:
        if active.all():
            self.counts += 1
        else:
            self.counts[torch.from_numpy(active)] += 1
        for (lr, beta1, beta2, weight_decay, eps, decoupled), (params, grads, m, v, counts) in self._bucket(active):
            kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
            kernel(params, grads, m, v, [], counts, amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
                   weight_decay=weight_decay, eps=eps, maximize=False, grad_scale=None, found_inf=None)
