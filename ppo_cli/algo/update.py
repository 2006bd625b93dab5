"""The PPO update: the clipped-surrogate loss of one minibatch, and the epoch/minibatch loop around it
(`Updater`), which takes its gradients from one source chosen when it is built (`Gradients`).

Minimised: -L_clip + vf_coef * L_vf - ent_coef * S, with ratio r = pi_new(a|s) / pi_old(a|s).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ppo_cli import distributed
from ppo_cli.algo.compiled import skip_dynamo_import, with_fallback
from ppo_cli.algo.fast.core import NumpyGradients, covers
from ppo_cli.algo.storage import Batch
from ppo_cli.distributed import Ranks


@dataclass
class UpdateSettings:
    clip_range: float
    clip_range_vf: float | None
    ent_coef: float
    vf_coef: float
    max_grad_norm: float
    K_epochs: int
    batch_size: int
    normalize_advantage: bool
    target_kl: float | None


# grad_clipped: 1 where the clip cut the minibatch step's gradient (its mean: the share of steps clipped).
STAT_NAMES = ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "grad_norm", "grad_clipped")
# Rewards beyond this magnitude (PPO's defaults assume rewards of order 1 to 100) are what an update that diverges
# is blamed on, unless env.normalize_reward already scales them.
HUGE_REWARD = 1e6


def divergence_message(step: int, bad: Sequence[str], largest_reward: float | None, normalize_reward: bool) -> str:
    """The one line for an update at `step` whose statistics `bad` became non-finite: the env's rewards as the cause
    where they were huge and unscaled (`largest_reward`: the largest magnitude the envs returned, from
    wrappers.largest_reward), else the hyperparameters."""
    if largest_reward is not None and largest_reward > HUGE_REWARD and not normalize_reward:
        fix = (f"the env's rewards reached {largest_reward:.3g} in magnitude, too large for the losses: set "
               f"env.normalize_reward=true")
    else:
        fix = "lower algo.lr_actor / algo.lr_critic, algo.clip_range or algo.gae_lambda"
    return (f"training diverged in the update at step {step:,}: {', '.join(bad)} became non-finite; {fix} "
            f"(checkpoints written before it are kept)")


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_clip to maximise, ratio). r = exp(logp_new - logp_old): new over old."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * advantages, torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages)
    return surrogate.mean(), ratio


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip_range_vf: float | None) -> torch.Tensor:
    """MSE(V, R); with clip_range_vf, the larger of the clipped and unclipped errors (PPO2's pessimistic form)."""
    err = (values - returns) ** 2
    if clip_range_vf is None:
        return err.mean()
    clipped = old_values + torch.clamp(values - old_values, -clip_range_vf, clip_range_vf)
    return torch.max(err, (clipped - returns) ** 2).mean()


def minibatch_loss(policy: nn.Module, mb: Batch, s: UpdateSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Total loss of one minibatch and its statistics [policy_loss, value_loss, entropy, approx_kl, clip_frac].

    Plain tensors in, a loss out: the hot path, kept in one function so a faster version can replace it.
    """
    # Masks and sequences are passed only where the run has them, so a policy of one's own that has neither
    # keeps the two-argument evaluate.
    extra = (mb.masks, mb.starts, mb.states, mb.seq_len) if mb.seq_len else (() if mb.masks is None else (mb.masks,))
    logp, entropy, values = policy.evaluate(mb.obs, mb.actions, *extra)
    adv = mb.advantages
    if s.normalize_advantage and adv.numel() > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    l_clip, ratio = clipped_surrogate(logp, mb.logp, adv, s.clip_range)
    l_vf = value_loss(values, mb.values, mb.returns, s.clip_range_vf)
    ent = entropy.mean()
    loss = -l_clip + s.vf_coef * l_vf - s.ent_coef * ent
    with torch.no_grad():
        log_ratio = logp - mb.logp
        approx_kl = ((ratio - 1.0) - log_ratio).mean()
        clip_frac = ((ratio - 1.0).abs() > s.clip_range).float().mean()
        stats = torch.stack([-l_clip, l_vf, ent, approx_kl, clip_frac])
    return loss, stats


LossFn = Callable[[nn.Module, Batch, UpdateSettings], tuple[torch.Tensor, torch.Tensor]]


def compile_loss(say: Callable[[str], None]) -> LossFn:
    """minibatch_loss through torch.compile, for the autograd path (`torch_compile=true`); where it cannot be
    compiled, `say` one note and compute it uncompiled (compiled.with_fallback).

    Inductor fuses the loss's forward and backward graphs into a few generated kernels: about 35% off an
    autograd minibatch step of a [64, 64] shared-trunk policy on the CPU, about 5% at [256, 256] and batch
    2048, for 5-20 s of compiling at the first minibatch.
    """
    return with_fallback(minibatch_loss, "the loss", say)


class Gradients(Protocol):
    """A gradient source: the loss of a minibatch, its gradients written into the parameters' .grad, and the
    minibatch's statistics. AutogradGradients here; fast.core.NumpyGradients where it covers the policy."""

    def epoch(self, shuffled: Batch) -> None:
        """Take this epoch's shuffled batch; minibatches are slices of it."""

    def minibatch(self, start: int, stop: int, s: UpdateSettings) -> Any:
        """Loss and gradients of rows [start, stop); the 5 statistics of minibatch_loss."""

    def clip(self, stats: Any, max_norm: float) -> Any:
        """Clip the global gradient norm; the statistics with the norm before clipping and whether it was clipped
        (1 or 0) appended."""

    def average(self, ranks: Ranks) -> None:
        """Replace the gradients by their mean over the ranks of a distributed run."""

    def mean(self, rows: list[Any]) -> list[float]: ...


class AutogradGradients:
    """Gradients by autograd through `loss_fn` (minibatch_loss, or its torch.compile'd form)."""

    def __init__(self, policy: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn = minibatch_loss) -> None:
        self.policy, self.optimizer, self.loss_fn = policy, optimizer, loss_fn
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.shuffled: Batch | None = None

    def epoch(self, shuffled: Batch) -> None:
        self.shuffled = shuffled

    def minibatch(self, start: int, stop: int, s: UpdateSettings) -> torch.Tensor:
        loss, stats = self.loss_fn(self.policy, self.shuffled[start:stop], s)  # type: ignore[index]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return stats

    def clip(self, stats: torch.Tensor, max_norm: float) -> torch.Tensor:
        norm = clip_grad_norm(self.params, max_norm).detach().reshape(1)
        return torch.cat([stats, norm, (norm > max_norm).to(norm.dtype)])

    def average(self, ranks: Ranks) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = _flatten_dense_tensors(grads)  # one all-reduce for all gradients
        distributed.average(flat, ranks)
        torch._foreach_copy_(grads, _unflatten_dense_tensors(flat, grads))

    @staticmethod
    def mean(rows: list[torch.Tensor]) -> list[float]:
        return torch.stack(rows).mean(0).tolist()  # one device sync per update


class Updater:
    """The PPO update: K_epochs passes over the shuffled batch in minibatches, with a gradient source and an
    optimizer step chosen once (`build`); nothing is rebuilt per update."""

    def __init__(self, gradients: Gradients, step: Callable[[], Any], generator: torch.Generator,
                 ranks: Ranks | None = None) -> None:
        self.gradients, self.step, self.generator = gradients, step, generator
        self.ranks = ranks or Ranks()

    @classmethod
    def build(cls, policy: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
              fast_update: bool = True, torch_compile: bool = False, ranks: Ranks | None = None,
              say: Callable[[str], None] = print) -> tuple[Updater, list[str]]:
        """The updater for `policy`, and the notes to print: where fast_update=true cannot use the numpy loss
        (saying why), or torch_compile=true has nothing to compile; `say` tells of a loss that fails to compile."""
        notes = []
        gradients: Gradients | None = None
        if fast_update:
            activation, why = covers(policy)
            if activation is not None:
                gradients = NumpyGradients(policy, activation)  # type: ignore[arg-type]
                if torch_compile:
                    notes.append("note: torch_compile=true has no effect: the numpy update (fast_update=true) "
                                 "covers this policy and is faster than the compiled autograd loss "
                                 "(docs/speed.md)")
            else:
                notes.append(f"note: fast_update: computing gradients with autograd ({why})")
        if gradients is None:
            gradients = AutogradGradients(policy, optimizer, compile_loss(say) if torch_compile else minibatch_loss)
        step = (FusedAdamStep.build(optimizer) if fast_update else None) or optimizer.step
        return cls(gradients, step, generator, ranks), notes

    def _permutation(self, batch: Batch) -> torch.Tensor:
        """This epoch's order of the rows: shuffled samples, or for a recurrent policy shuffled sequences (one env's
        steps of one chunk of seq_len steps), each kept whole and in time order. The rollout's rows are
        t * envs + env, so sequence j = chunk * envs + env starts at row chunk * seq_len * envs + env."""
        device = self.generator.device  # a CUDA generator shuffles on the GPU
        if not batch.seq_len:
            return torch.randperm(len(batch), generator=self.generator, device=device)
        envs, seq_len = batch.envs, batch.seq_len
        order = torch.randperm(len(batch) // seq_len, generator=self.generator, device=device)
        first = order // envs * (seq_len * envs) + order % envs
        return (first[:, None] + envs * torch.arange(seq_len, device=device)[None, :]).flatten()

    def update(self, batch: Batch, s: UpdateSettings) -> dict[str, float]:
        """K_epochs passes over the shuffled batch; stops early once a minibatch's KL exceeds 1.5 * target_kl.

        Each epoch permutes the whole batch once and then takes contiguous slices: the same minibatches, in the
        same order, as indexing every minibatch with its slice of the permutation, for one gather per epoch.
        Statistics are averaged over the minibatch steps taken and read back once, at the end, so the loop
        never waits on a device sync for logging.
        """
        # An update that diverges overflows the numpy gradients (fast path) into inf and NaN; the trainer reports it
        # from the non-finite statistics in one line (divergence_message), so numpy's warnings would only be noise.
        with np.errstate(all="ignore"):
            return self._update(batch, s)

    def _update(self, batch: Batch, s: UpdateSettings) -> dict[str, float]:
        n, g = len(batch), self.gradients
        taken: list = []  # per minibatch step: its 5 statistics and its gradient norm
        epochs_done, stopped_early = 0, False
        # Distributed: a minibatch is every rank's slice together, so its advantages are normalized with the
        # statistics of all of them (as one process normalizes its minibatch), before the loss sees them.
        across = self.ranks.active and s.normalize_advantage
        loss_settings = replace(s, normalize_advantage=False) if across else s
        for _ in range(s.K_epochs):
            shuffled = batch[self._permutation(batch)]
            g.epoch(shuffled)
            for start in range(0, n, s.batch_size):
                if across:
                    distributed.normalize(shuffled.advantages[start:start + s.batch_size], self.ranks)
                stats = g.minibatch(start, start + s.batch_size, loss_settings)
                # Distributed: the ranks decide together, so they take the same steps.
                if s.target_kl is not None and distributed.mean(float(stats[3]), self.ranks) > 1.5 * s.target_kl:
                    stopped_early = True
                    break
                if self.ranks.active:
                    g.average(self.ranks)
                taken.append(g.clip(stats, s.max_grad_norm))
                self.step()
            if stopped_early:
                break
            epochs_done += 1
        means = g.mean(taken) if taken else [0.0] * len(STAT_NAMES)
        out = dict(zip(STAT_NAMES, means, strict=True))
        out.update(minibatch_steps=float(len(taken)), epochs=float(epochs_done), stopped_early=float(stopped_early))
        return out


class FusedAdamStep:
    """optimizer.step() of a fused Adam or AdamW, calling its fused kernel directly.

    On small networks Adam.step's Python wrapper (hooks, a profiler scope, grouping tensors by device and
    dtype, per-group state checks) costs about 40 us per parameter group around a kernel that takes 5; on
    setting A of benchmarks/speed.py that was an eighth of a minibatch step. This does what torch's fused
    path does for a plain group (add 1 to the step counts, run the kernel) on torch's own state tensors, so a
    checkpoint or a later optimizer.step() sees no difference; tests/test_fastpath.py checks it step for step
    against optimizer.step(). `build` returns None for anything else (no fused kernel, amsgrad, maximize,
    capturable or differentiable groups, step hooks). The first call creates the state as Adam's fused path does
    (zeros, a float32 step on the parameter's device), which keeps optimizer.step() and its import of torch._dynamo
    (about 1 s) out of a run that compiles nothing.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.groups: list[tuple[dict, list[list[torch.Tensor]]]] | None = None  # state tensors per group

    @classmethod
    def build(cls, optimizer: torch.optim.Optimizer) -> FusedAdamStep | None:
        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or not hasattr(torch, "_fused_adam_"):
            return None
        if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
            return None
        for g in optimizer.param_groups:
            if not g.get("fused") or g["amsgrad"] or g["maximize"] or g["capturable"] or g["differentiable"]:
                return None
        return cls(optimizer)

    def _state_lists(self) -> list[tuple[dict, list[list[torch.Tensor]]]]:
        out = []
        for group in self.optimizer.param_groups:
            params = group["params"]
            states = [self.optimizer.state[p] for p in params]
            out.append((group, [params, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                                [st["step"] for st in states]]))
        return out

    def _create_state(self) -> None:
        """Adam's lazy state initialization for fused groups (torch.optim.Adam._init_group), for every parameter."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if not self.optimizer.state.get(p):
                    self.optimizer.state[p] = {
                        "step": torch.zeros((), dtype=torch.float32, device=p.device),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def __call__(self) -> None:
        if self.groups is None:
            if any(p.grad is None for group in self.optimizer.param_groups for p in group["params"]):
                self.optimizer.step()  # see below
                return
            self._create_state()
            self.groups = self._state_lists()
        grads = [[p.grad for p in params] for _, (params, *_) in self.groups]  # autograd's are new every step
        if any(g is None for group_grads in grads for g in group_grads):
            self.optimizer.step()  # torch skips parameters without a gradient; so does its own step
            return
        decoupled = isinstance(self.optimizer, torch.optim.AdamW)
        for (group, (params, exp_avgs, exp_avg_sqs, steps)), group_grads in zip(self.groups, grads, strict=True):
            torch._foreach_add_(steps, 1)
            kernel = torch._fused_adamw_ if decoupled or group.get("decoupled_weight_decay") else torch._fused_adam_
            beta1, beta2 = group["betas"]
            kernel(params, group_grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
                   beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                   grad_scale=None, found_inf=None)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """nn.utils.clip_grad_norm_ (2-norm over all gradients, scaled by max_norm / (norm + 1e-6) when larger) in
    four ops: one concatenation instead of a norm per tensor, which is what costs on small networks."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.cat([g.reshape(-1) for g in grads]).norm()
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp_(max=1.0))
    return total


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 no better than a constant; nan if R is constant."""
    var = returns.var()
    return float("nan") if var == 0 else float(1.0 - (returns - values).var() / var)


def make_optimizer(policy: nn.Module, name: str, lr_actor: float, lr_critic: float, eps: float,
                   weight_decay: float, compiles: bool = False) -> torch.optim.Optimizer:
    """Adam or AdamW with two parameter groups: 'actor' at lr_actor and 'critic' at lr_critic. `compiles`: the
    run compiles something (torch_compile=true); else torch._dynamo is kept out (compiled.skip_dynamo_import)."""
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    if not compiles:
        skip_dynamo_import(cls)
    groups = [{"params": policy.actor_parameters(), "lr": lr_actor, "name": "actor"},
              {"params": policy.critic_parameters(), "lr": lr_critic, "name": "critic"}]
    # The fused kernel updates every parameter of a group in one call; on small networks Adam's per-tensor
    # loop otherwise costs about a fifth of a minibatch step.
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return cls(groups, eps=eps, weight_decay=weight_decay, fused=fused or None)
