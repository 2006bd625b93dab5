"""The MLP policy's hot paths in numpy on the CPU: the PPO loss with its gradients written out by hand
(NumpyLoss, the update's gradient source) and the rollout's forward pass (NumpyActor).

On networks this small a minibatch step is bound by per-op overhead, not arithmetic: autograd records the
forward graph op by op and replays it through generic kernels, and every torch op costs several microseconds of
dispatch where numpy spends about one. Two kernels also differ by far more than dispatch on this class of CPU:
numpy's tanh is about 7x faster than torch's (200 us against 1.4 ms on 2048 x 256 floats, one thread) and its
exp about 1.8x, which is a quarter of a large-batch update. So the loss and every gradient are explicit matrix
products on numpy views of the parameters' and gradients' memory: the optimizer sees the gradients in place and
the arrays see every in-place optimizer step, without a copy either way. Layer outputs and backward scratch live
in buffers allocated once per minibatch size for the whole run, so a long run does not grow the heap. The
action distributions' maths is each head's numpy twin (heads.py here), the network input the policy's `prepare`
in numpy (observations.py here).

`covers(policy)` says whether this path computes exactly what the torch policy does: the policy must be
ppo-cli's ActorCritic itself (no subclass), on MLP encoders of Linear layers and one activation, CPU float32,
and the layers the fast path reads must be every parameter of the policy (by identity and count). Otherwise the
trainer uses the torch path and says why in one line. tests/test_fastpath.py checks losses and every gradient
against autograd for each activation, action head, shared or separate trunks, and clip_range_vf.

The gradient of -min(r A, clip(r) A) with respect to r is -A where the unclipped term is the smaller (or they
are equal) and -A * [1-eps <= r <= 1+eps] elsewhere; autograd splits exact ties half and half between the two
branches, which gives the same total whenever it matters (a tie with r outside the clip range needs A = 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from ppo_cli import distributed
from ppo_cli.algo.fast.heads import numpy_head
from ppo_cli.algo.fast.observations import NumpyInput, uncovered_parts
from ppo_cli.algo.storage import Batch
from ppo_cli.policy.actor_critic import ActorCritic
from ppo_cli.policy.encoders import MLPEncoder

_SLOPE = np.float32(0.01)  # nn.LeakyReLU's default negative slope, which encoders.MLPEncoder uses
_ACTIVATIONS = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu"}


def _linears(encoder: nn.Module, head: nn.Linear | None) -> list[nn.Linear]:
    return [m for m in encoder if isinstance(m, nn.Linear)] + ([head] if head is not None else [])


def covers(policy: nn.Module) -> tuple[str | None, str]:
    """(the activation, "") where the numpy path computes exactly what `policy` does, else (None, why not)."""
    if hasattr(policy, "members"):  # policy/groups.py
        return None, "the numpy path covers one policy, not one per agent group (network.share=false)"
    if type(policy) is not ActorCritic:
        return None, f"{type(policy).__name__} is not ppo-cli's ActorCritic"
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in policy.parameters()):
        return None, "the numpy path runs on CPU float32 parameters only"
    if policy.actor_core is not None:
        return None, "the numpy path covers policies without a recurrent core"
    encoders = (policy.actor_encoder, policy.critic_encoder)
    if any(type(e) is not MLPEncoder for e in encoders):
        return None, "the numpy path covers MLP encoders only"
    kinds = {type(m) for e in encoders for m in e}
    acts = [_ACTIVATIONS[k] for k in kinds if k in _ACTIVATIONS]
    if len(acts) != 1 or not kinds <= {nn.Linear, *_ACTIVATIONS}:
        return None, "the encoders are not Linear layers with one activation"
    if numpy_head(policy.dist) is None:
        return None, f"the {type(policy.dist).__name__} action head has no numpy twin (fast/heads.py)"
    parts = uncovered_parts(policy.layout)
    if parts:
        return None, f"the observation parts {', '.join(parts)} have no numpy encoder (fast/observations.py)"
    covered = [p for net in _networks(policy, acts[0]) if net is not None for layer in net.layers
               for p in (layer.weight, layer.bias)] + policy.dist.own_parameters()
    params = list(policy.parameters())
    if len(covered) != len(params) or {id(p) for p in covered} != {id(p) for p in params}:
        return None, f"it reads {len(covered)} of the policy's {len(params)} parameter tensors"
    return acts[0], ""


def _columns(policy: ActorCritic) -> np.ndarray | None:
    """The input columns the actor reads where the critic reads more (ActorCritic.actor_columns), else None."""
    return None if policy.actor_columns is None else policy.actor_columns.numpy()


def _view(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def flat_grads(params: list[nn.Parameter]) -> torch.Tensor:
    """Give every parameter a .grad that is a view of one zeroed buffer, and return the buffer."""
    flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


CONTIGUOUS_FROM = 16  # layers of this many outputs or more read contiguous copies of their weights (NumpyMLP)


class NumpyMLP:
    """Linear layers with one activation between them (and after the last, for a shared trunk), on numpy views
    of the torch parameters."""

    def __init__(self, layers: list[nn.Linear], activation: str, activate_last: bool = False,
                 weights: list[np.ndarray] | None = None, biases: list[np.ndarray] | None = None) -> None:
        self.layers = layers
        # [out, in], as torch stores them; or, for the members of a batch (stacked.py), [members, out, in] with
        # biases [members, 1, out], every operation below then running on each member's slice.
        self.weights = [_view(layer.weight) for layer in layers] if weights is None else weights
        self.biases = [_view(layer.bias) for layer in layers] if biases is None else biases
        self._transposed = [w.swapaxes(-1, -2) for w in self.weights]
        # numpy's matmul reads a transposed view of a layer with many outputs about 40% slower than a C-contiguous
        # copy (64 x 64: 70 us against 44 for a batch of 8 members); `refresh` makes the copies, for as long as the
        # weights stay as they are (a rollout; one minibatch's forward).
        self._copies = [np.empty(t.shape, np.float32) if t.shape[-1] >= CONTIGUOUS_FROM else None
                        for t in self._transposed]
        self._read: list[np.ndarray] = self._transposed
        self.activation = activation
        self.activate_last = activate_last

    def refresh(self) -> None:
        """Read contiguous copies of the weights as they are now, until `thaw` (see __init__)."""
        self._read = [t if c is None else c for t, c in zip(self._transposed, self._copies, strict=True)]
        for t, c in zip(self._transposed, self._copies, strict=True):
            if c is not None:
                np.copyto(c, t)

    def thaw(self) -> None:
        """Read the weights themselves again (they may change)."""
        self._read = self._transposed

    def _activate(self, h: np.ndarray) -> None:
        if self.activation == "tanh":
            np.tanh(h, out=h)
        elif self.activation == "relu":
            np.maximum(h, 0.0, out=h)
        else:  # leaky_relu(h) = max(h, slope * h) for a slope below 1
            np.maximum(h, _SLOPE * h, out=h)

    def _activation_grad(self, g: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
        """g *= d(activation)/d(pre-activation), from the activation's output: 1 - out^2, or the sign of out."""
        if self.activation == "tanh":
            np.multiply(out, out, out=tmp)
            np.subtract(1.0, tmp, out=tmp)
            g *= tmp
        elif self.activation == "relu":
            g *= out > 0
        else:
            g *= np.where(out > 0, np.float32(1.0), _SLOPE)

    def forward(self, x: np.ndarray, outs: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Every layer's output, the network's output last; written into `outs` when given."""
        h, result = x, []
        last = len(self.weights) - 1
        for i, (w_t, b) in enumerate(zip(self._read, self.biases, strict=True)):
            if outs is None:
                h = h @ w_t
            else:
                h = np.matmul(h, w_t, out=outs[i])
            h += b
            if i < last or self.activate_last:
                self._activate(h)
            result.append(h)
        return result

    def backward(self, x: np.ndarray, outs: list[np.ndarray], g: np.ndarray,
                 grads: list[tuple[np.ndarray, np.ndarray]], scratch: list[tuple[np.ndarray, np.ndarray]],
                 input_grad: np.ndarray | None = None) -> None:
        """Write dL/dW and dL/db of every layer into `grads`, given dL/d(output) `g` (overwritten) and the
        forward's `outs`, and dL/dx into `input_grad` when given. `scratch` holds two arrays shaped like each
        layer's output but the last (and the last's too, for activate_last)."""
        last = len(self.weights) - 1
        if self.activate_last:
            self._activation_grad(g, outs[last], scratch[last][1])
        for i in range(last, -1, -1):
            inp = outs[i - 1] if i else x
            grad_w, grad_b = grads[i]
            np.matmul(g.swapaxes(-1, -2), inp, out=grad_w)
            np.add.reduce(g, axis=-2, out=grad_b)  # np.sum's own call, without its wrapper
            if i:
                g_in, tmp = scratch[i - 1]
                np.matmul(g, self.weights[i], out=g_in)
                self._activation_grad(g_in, inp, tmp)
                g = g_in
            elif input_grad is not None:
                np.matmul(g, self.weights[0], out=input_grad)


@contextmanager
def contiguous(nets: Iterable[NumpyMLP | None]) -> Iterator[None]:
    """Within: `nets` read contiguous copies of their weights as they are on entry (NumpyMLP.refresh)."""
    live = [net for net in nets if net is not None]
    for net in live:
        net.refresh()
    try:
        yield
    finally:
        for net in live:
            net.thaw()


def _networks(policy: ActorCritic, activation: str) -> tuple[NumpyMLP | None, NumpyMLP, NumpyMLP]:
    """(trunk, actor, critic): with separate encoders, no trunk and two whole MLPs on the input; with a shared
    trunk, the trunk (activated output) and the two single output layers on top of it."""
    if policy.shared_trunk:
        return (NumpyMLP(_linears(policy.actor_encoder, None), activation, activate_last=True),
                NumpyMLP([policy.policy_head], activation), NumpyMLP([policy.value_head], activation))
    return (None, NumpyMLP(_linears(policy.actor_encoder, policy.policy_head), activation),
            NumpyMLP(_linears(policy.critic_encoder, policy.value_head), activation))


class NumpyLoss:
    """The PPO loss of one minibatch and its gradients, written into the parameters' .grad memory.

    With separate encoders, `actor` and `critic` are whole MLPs on the input; with a shared trunk, `trunk`
    maps the input to the hidden output both heads read, and `actor` and `critic` are the single output
    layers, whose input gradients add up on the way back into the trunk.

    The members of a batched run (stacked.py) use the same loss on stacked arrays: every input gains a leading
    member axis, the settings are per-member columns, and each member's slice is computed as one run's.
    """

    def __init__(self, policy: ActorCritic, activation: str) -> None:
        self.trunk, self.actor, self.critic = _networks(policy, activation)
        self.dist, self.head = policy.dist, numpy_head(policy.dist)
        self.actor_columns = _columns(policy)
        # Every gradient is a view of one flat buffer: the loss writes into the views, the optimizer reads the
        # parameters' .grad, and the gradient clip is one norm and one scale over the buffer. The buffer is in the
        # optimizer groups' order, the layout of a batch's stacked members (stacked.py), so that a member's norm
        # sums the same numbers in the same order without a gather.
        self.flat_grad = flat_grads([*policy.actor_parameters(), *policy.critic_parameters()]).numpy()
        self.grads = {name: [(_view(m.weight.grad), _view(m.bias.grad)) for m in net.layers]  # type: ignore[arg-type]
                      for name, net in self._networks().items() if net is not None}
        self.dist_grads = [_view(p.grad) for p in self.dist.own_parameters()]  # type: ignore[arg-type]
        self.lead: tuple[int, ...] = ()  # the member axis of a batch: (members,)
        self._buffers: dict[int, dict[str, Any]] = {}

    def _networks(self) -> dict[str, NumpyMLP | None]:
        return {"trunk": self.trunk, "actor": self.actor, "critic": self.critic}

    def _buffers_for(self, n: int) -> dict[str, Any]:
        """Layer outputs and backward scratch of every network for minibatches of n, allocated on first use."""
        if n not in self._buffers:
            def alloc(net: NumpyMLP | None) -> tuple[list, list]:
                if net is None:
                    return [], []
                widths = [w.shape[-2] for w in net.weights]
                outs = [np.empty((*self.lead, n, w), np.float32) for w in widths]
                scratch = [(np.empty((*self.lead, n, w), np.float32), np.empty((*self.lead, n, w), np.float32))
                           for w in (widths if net.activate_last else widths[:-1])]
                return outs, scratch

            b = {name: alloc(net) for name, net in self._networks().items()}
            if self.trunk is not None:  # dL/d(trunk output) from each head
                width = self.trunk.weights[-1].shape[-2]
                b["head_grads"] = (np.empty((*self.lead, n, width), np.float32),
                                   np.empty((*self.lead, n, width), np.float32))
            self._buffers[n] = b
        return self._buffers[n]

    def loss_and_grads(self, x: np.ndarray, actions: np.ndarray, old_logp: np.ndarray, old_values: np.ndarray,
                       adv: np.ndarray, returns: np.ndarray, clip_range: Any, clip_range_vf: Any,
                       ent_coef: Any, vf_coef: Any, normalize_advantage: bool,
                       mask: np.ndarray | None = None) -> np.ndarray:
        """Overwrite .grad of every parameter with d(loss)/d(param) and return [policy_loss, value_loss,
        entropy, approx_kl, clip_fraction], as ppo.minibatch_loss does (for a batch: per member, [members, 5],
        with the settings given as float64 [members, 1] columns)."""
        with contiguous(self._networks().values()):  # this step's weights: the optimizer changed them since the last
            return self._loss_and_grads(x, actions, old_logp, old_values, adv, returns, clip_range, clip_range_vf,
                                        ent_coef, vf_coef, normalize_advantage, mask)

    def _loss_and_grads(self, x: np.ndarray, actions: np.ndarray, old_logp: np.ndarray, old_values: np.ndarray,
                        adv: np.ndarray, returns: np.ndarray, clip_range: Any, clip_range_vf: Any, ent_coef: Any,
                        vf_coef: Any, normalize_advantage: bool, mask: np.ndarray | None) -> np.ndarray:
        n = x.shape[-2]
        buf = self._buffers_for(n)
        (a_outs, a_scratch), (c_outs, c_scratch) = buf["actor"], buf["critic"]
        a_in_grad = c_in_grad = None
        features = x
        if self.trunk is not None:
            features = self.trunk.forward(x, buf["trunk"][0])[-1]
            a_in_grad, c_in_grad = buf["head_grads"]
        actor_in = features if self.actor_columns is None else np.take(features, self.actor_columns, axis=-1)
        out = self.actor.forward(actor_in, a_outs)[-1]
        if normalize_advantage and n > 1:  # unbiased std, as torch's; ndarray.mean/std cost ~10 us each here
            centred = adv - _total(adv) / np.float32(n)
            adv = centred / (np.sqrt(_dot(centred, centred) / np.float32(n - 1)) + np.float32(1e-8))

        logp, entropy, cache = self.head.log_prob_entropy(out, actions, mask)
        log_ratio = logp - old_logp
        ratio = np.exp(log_ratio)
        surr1 = ratio * adv
        clipped = np.clip(ratio, _f32(1.0 - clip_range), _f32(1.0 + clip_range))
        surr2 = clipped * adv
        policy_loss = -_total(np.minimum(surr1, surr2)) / n
        # d policy_loss / d logp = -(1/n) * r * A where the unclipped term counts, else 0 (see the module doc)
        counts = (surr1 <= surr2) | (clipped == ratio)
        g_logp = surr1 * counts * np.float32(-1.0 / n)
        g_out, g_dist = self.head.grad(cache, actions, g_logp, _per(ent_coef, n))
        for view, g in zip(self.dist_grads, g_dist, strict=True):
            view[...] = g
        self.actor.backward(actor_in, a_outs, g_out, self.grads["actor"], a_scratch, a_in_grad)

        values = self.critic.forward(features, c_outs)[-1][..., 0]
        value_loss, g_values = self._value_loss(values, old_values, returns, clip_range_vf)
        g_value = (g_values * _per(vf_coef, n))[..., None]
        self.critic.backward(features, c_outs, g_value, self.grads["critic"], c_scratch, c_in_grad)
        if self.trunk is not None:
            a_in_grad += c_in_grad
            self.trunk.backward(x, buf["trunk"][0], a_in_grad, self.grads["trunk"], buf["trunk"][1])

        ratio_m1 = ratio - 1.0
        approx_kl = _total(ratio_m1 - log_ratio) / n
        clip_frac = np.count_nonzero(np.abs(ratio_m1) > _f32(clip_range), axis=-1) / n
        stats = [policy_loss, value_loss, _total(entropy) / n, approx_kl, clip_frac]
        return np.array(stats) if x.ndim == 2 else np.stack([np.reshape(v, self.lead) for v in stats], axis=-1)

    @staticmethod
    def _value_loss(values: np.ndarray, old_values: np.ndarray, returns: np.ndarray,
                    clip_range_vf: Any) -> tuple[Any, np.ndarray]:
        """ppo.value_loss and its gradient times n: 2 (V - R), or for the clipped form the gradient of the
        larger error (half of each where they tie, as autograd splits torch.max) with clamp's zero gradient
        outside the clip range."""
        err = values - returns
        n = values.shape[-1]
        if clip_range_vf is None:
            return _loss(_dot(err, err), n), 2.0 * err
        delta = values - old_values
        clip_range_vf = _f32(clip_range_vf)
        err_c = old_values + np.clip(delta, -clip_range_vf, clip_range_vf) - returns
        sq, sq_c = err * err, err_c * err_c
        g, g_c = 2.0 * err, 2.0 * err_c * (np.abs(delta) <= clip_range_vf)
        grad = np.where(sq > sq_c, g, np.where(sq < sq_c, g_c, 0.5 * (g + g_c)))
        return _loss(_total(np.maximum(sq, sq_c)), n), grad.astype(np.float32, copy=False)


def _total(a: np.ndarray) -> Any:
    """The sum over the last axis: a scalar for one run's [n], [members, 1] for a batch's [members, n]."""
    return np.add.reduce(a) if a.ndim == 1 else np.add.reduce(a, axis=-1, keepdims=True)


def _dot(a: np.ndarray, b: np.ndarray) -> Any:
    """a . b over the last axis, each member by BLAS's dot as one run computes it (so a member's loss is that run's
    to the bit): a scalar, or [members, 1]."""
    if a.ndim == 1:
        return np.dot(a, b)
    return np.array([np.dot(x, y) for x, y in zip(a, b, strict=True)], np.float32)[:, None]


def _loss(total: Any, n: int) -> Any:
    """A loss's mean from its sum: a float for one run (the statistic it logs), [members, 1] for a batch."""
    return float(total) / n if np.ndim(total) == 0 else total.astype(np.float64) / n


def _f32(value: Any) -> Any:
    """A setting as numpy takes a Python float next to float32 arrays: a float as it is, a [members, 1] column of
    float64 (a batch's) rounded to float32 (an array of float64 would make the results float64)."""
    return value if np.ndim(value) == 0 else np.asarray(value).astype(np.float32)


def _per(coef: Any, n: int) -> Any:
    """coef / n as float32: a scalar for one run, a [members, 1] column for a batch."""
    return np.float32(coef / n) if np.ndim(coef) == 0 else (np.asarray(coef, np.float64) / n).astype(np.float32)


def clip_flat_grad(flat: np.ndarray, max_norm: float) -> float:
    """clip_grad_norm on the flat gradient buffer; returns the norm before clipping."""
    norm = float(np.sqrt(np.dot(flat, flat)))
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        flat *= np.float32(coef)
    return norm


class NumpyGradients:
    """ppo.update's gradient source on NumpyLoss (the interface is ppo.Gradients)."""

    def __init__(self, policy: ActorCritic, activation: str) -> None:
        self.loss = NumpyLoss(policy, activation)
        self.columns: list[np.ndarray] = []
        self.masks: np.ndarray | None = None

    def epoch(self, shuffled: Batch) -> None:
        self.columns = [t.numpy() for t in (shuffled.obs, shuffled.actions, shuffled.logp, shuffled.values,
                                            shuffled.advantages, shuffled.returns)]
        self.masks = None if shuffled.masks is None else shuffled.masks.numpy()

    def minibatch(self, start: int, stop: int, s: Any) -> np.ndarray:
        return self.loss.loss_and_grads(*(c[start:stop] for c in self.columns), s.clip_range, s.clip_range_vf,
                                        s.ent_coef, s.vf_coef, s.normalize_advantage,
                                        None if self.masks is None else self.masks[start:stop])

    def clip(self, stats: np.ndarray, max_norm: float) -> np.ndarray:
        norm = clip_flat_grad(self.loss.flat_grad, max_norm)
        return np.append(stats, [norm, float(norm > max_norm)])

    def average(self, ranks: Any) -> None:

        distributed.average(torch.from_numpy(self.loss.flat_grad), ranks)  # the buffer itself, in place

    @staticmethod
    def mean(rows: list[np.ndarray]) -> list[float]:
        return np.mean(rows, axis=0).tolist()


class NumpyActor:
    """The rollout's forward pass and action sampling in numpy, on views of the policy's own parameters (the
    interface is rollout.Actor; rollout.TorchActor is the torch twin it replaces).

    Acting on 8 observations is about 15 small ops; torch spends several microseconds of dispatch on each,
    numpy about one. Observation normalization updates the policy's own statistics (in torch, once per step)
    and applies them as the policy's `prepare` does.
    """

    def __init__(self, policy: ActorCritic, activation: str, rng: np.random.Generator) -> None:
        self.policy, self.rng = policy, rng
        self.trunk, self.actor, self.critic = _networks(policy, activation)
        self.dist, self.head = policy.dist, numpy_head(policy.dist)
        self.input = NumpyInput(policy.layout, policy.obs_norm)
        self.actor_columns = _columns(policy)

    def frozen(self) -> AbstractContextManager[None]:
        """A rollout: the weights do not change, so the forward passes read contiguous copies (NumpyMLP.refresh)."""
        return contiguous((self.trunk, self.actor, self.critic))

    def inputs(self, obs: Any, update_stats: bool = True, rows: np.ndarray | None = None) -> np.ndarray:
        """policy.prepare (and, in training, update_obs_stats) for a raw observation batch."""
        return self.input.prepare(obs, update_stats)

    def _features(self, x: np.ndarray) -> np.ndarray:
        return x if self.trunk is None else self.trunk.forward(x)[-1]

    def value(self, x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        return self.critic.forward(self._features(x))[-1][:, 0]

    def act(self, x: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sampled actions, their log-probs and the values, for a float32 batch of network inputs."""
        h = self._features(x)
        out = self.actor.forward(h if self.actor_columns is None else np.take(h, self.actor_columns, axis=-1))[-1]
        action, logp = self.head.sample(out, self.dist.noise(self.rng, out.shape[0]), mask)
        return action, logp, self.critic.forward(h)[-1][:, 0]

    def env_action(self, action: np.ndarray) -> np.ndarray:
        return self.dist.env_action(action)

    state = starts = None  # no recurrent state: the policies it covers have no core

    def end_episodes(self, ended: np.ndarray) -> None:
        pass
