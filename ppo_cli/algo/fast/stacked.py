"""The members of a batched run (algo/batched.py) on the numpy fast path: each member's policy keeps its own
parameters, optimizer and checkpoint format, but their memory is one [members, total] tensor (and their gradients
another), so one numpy operation on a stacked view computes a layer of every member.

Member k's slice of every operation is what the single run of member k computes: the same BLAS call on the same
numbers (numpy's matmul runs a stack of matrices one gemm per matrix), the same reductions per member (core._dot,
core._total). tests/test_batched.py checks a member against its single run.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from ppo_cli.algo.fast.core import NumpyLoss, NumpyMLP, _networks
from ppo_cli.algo.fast.heads import NumpyDiagGaussian, NumpyHead, numpy_head
from ppo_cli.policy.actor_critic import ActorCritic


class StackedParameters:
    """Every member's parameters re-pointed (`.data`) at views of one [members, total] float32 tensor, their .grad
    at views of another, and their Adam state (exp_avg, exp_avg_sq) at views of two more. The optimizers keep the
    same Parameter objects, so each member's optimizer and state_dict are what its single run's would be.

    A member's parameters are laid out by optimizer group (the actor's, then the critic's), so each group of each
    member is one contiguous slice: the optimizer step is the fused Adam kernel on one slice per member and group
    (`adam_step`), not on every parameter tensor of every member, which costs about twice as much on small networks.
    """

    def __init__(self, policies: list[ActorCritic], optimizers: list[torch.optim.Optimizer]) -> None:
        members = len(policies)
        groups = [[list(g["params"]) for g in opt.param_groups] for opt in optimizers]
        total = sum(p.numel() for g in groups[0] for p in g)
        self.data, self.grad = torch.empty(members, total), torch.zeros(members, total)
        self.exp_avg, self.exp_avg_sq = torch.zeros(members, total), torch.zeros(members, total)
        # Adam's step count of each parameter (a float32 scalar in its state): an element each, counted together.
        self.counts = torch.zeros(members, sum(len(g) for g in groups[0]))
        self.where: dict[int, tuple[int, tuple[int, ...]]] = {}  # id(member 0's parameter) -> (offset, shape)
        self.slices: list[tuple[int, int, int]] = []  # per optimizer group: (offset, size, its first count)
        for k, (member_groups, opt) in enumerate(zip(groups, optimizers, strict=True)):
            offset = j = 0
            for group in member_groups:
                if k == 0:
                    self.slices.append((offset, sum(p.numel() for p in group), j))
                for p in group:
                    state, rows = opt.state.get(p, {}), (k, slice(offset, offset + p.numel()))
                    p.data = _view(self.data, rows, p, p.data)
                    p.grad = _view(self.grad, rows, p)
                    self.counts[k, j] = float(state.get("step", 0.0))
                    opt.state[p] = {"step": self.counts[k, j],
                                    "exp_avg": _view(self.exp_avg, rows, p, state.get("exp_avg")),
                                    "exp_avg_sq": _view(self.exp_avg_sq, rows, p, state.get("exp_avg_sq"))}
                    if k == 0:
                        self.where[id(p)] = (offset, tuple(p.shape))
                    offset, j = offset + p.numel(), j + 1
        self.optimizers = optimizers
        # The gradient norm sums a member's row in this layout's order, the order of the single run's flat buffer
        # (NumpyLoss.flat_grad): the same sum to the last bit.
        if [id(p) for g in groups[0] for p in g] != [id(p) for p in (*policies[0].actor_parameters(),
                                                                     *policies[0].critic_parameters())]:
            raise AssertionError("the optimizer's groups are not the policy's actor and critic parameters")
        self._cached: dict[bytes, list] = {}
        self._data, self._grad = self.data.numpy(), self.grad.numpy()
        self._counts = self.counts.numpy()  # the same memory: numpy's += costs a fifth of torch's dispatch here
        self.members = members

    def adam_step(self, active: np.ndarray) -> None:
        """update.FusedAdamStep for the active members: each member and group's slice through the fused kernel,
        in one call for all the slices that share their settings."""
        rows = np.flatnonzero(active)
        if len(rows) == self.members:
            self._counts += 1
        else:
            self._counts[rows] += 1
        for (lr, beta1, beta2, weight_decay, eps, decoupled), (params, grads, m, v, counts) in self._calls(active):
            kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
            kernel(params, grads, m, v, [], counts, amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
                   weight_decay=weight_decay, eps=eps, maximize=False, grad_scale=None, found_inf=None)

    def forget_settings(self) -> None:
        """The members' optimizer settings may have changed (a schedule, before each update): the kernel calls are
        built again at the next step."""
        self._cached = {}

    def _calls(self, active: np.ndarray) -> list:
        """The kernel calls' settings and tensor lists, kept for each set of active members until forget_settings
        (through an update's minibatch steps): indexing out the slices costs more than the kernel."""
        key = active.tobytes()
        if key in self._cached:
            return self._cached[key]
        calls: dict[tuple, list[list[torch.Tensor]]] = {}
        for k in np.flatnonzero(active):
            opt = self.optimizers[k]
            decoupled = isinstance(opt, torch.optim.AdamW)
            for (offset, size, first), group in zip(self.slices, opt.param_groups, strict=True):
                setting = (group["lr"], *group["betas"], group["weight_decay"], group["eps"],
                           decoupled or bool(group.get("decoupled_weight_decay")))
                lists = calls.setdefault(setting, [[], [], [], [], []])
                for target, t in zip(lists, (self.data, self.grad, self.exp_avg, self.exp_avg_sq), strict=False):
                    target.append(t[k, offset:offset + size])
                lists[4].append(self.counts[k, first])
        self._cached[key] = list(calls.items())
        return self._cached[key]

    def subset(self, rows: list[int]) -> StackedParameters:
        """Copies of the parameters of members `rows` alone (for an evaluation of some members: they go stale at
        the next optimizer step)."""
        part = copy.copy(self)
        part._data, part._grad, part.members = self._data[rows], self._grad[rows], len(rows)
        return part

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
        loss.actor_columns = None  # batched runs are one-agent runs (batched.refusal)
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
            grads = self._grad[k]
            norm = float(np.sqrt(np.dot(grads, grads)))
            coef = float(max_norm[k]) / (norm + 1e-6)
            if coef < 1.0:
                grads *= np.float32(coef)
            norms[k] = norm
        return norms


def _view(stacked: torch.Tensor, rows: tuple[int, slice], like: torch.Tensor,
          value: torch.Tensor | None = None) -> torch.Tensor:
    """stacked[rows] shaped like `like`, holding `value` where given."""
    view = stacked[rows].view_as(like)
    if value is not None:
        view.copy_(value)
    return view
