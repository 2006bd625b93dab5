"""The numpy twins of the action heads (policy/heads.py): sampling, log-prob and entropy, and the loss's gradient
with respect to the network's outputs, written out by hand. One adapter per head class, reading only the head's
public attributes; `numpy_head` finds it, and a head without one is not covered (core.covers says so).

Each twin computes what its head does in torch: tests/test_fastpath.py compares every head's gradients with
autograd, with and without masks, and tests/test_masks_and_dict.py their samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ppo_cli.policy.heads import LOG_2PI, ActionHead, Bernoulli, Categorical, DiagGaussian, MultiCategorical


class NumpyHead:
    """The interface: `sample` (actions and their log-probs, as head.sample then head.log_prob_entropy give),
    `log_prob_entropy` (with what `grad` needs), and `grad`: dL/d(out) for dL/d logp = g_logp plus the entropy
    bonus -ent_coef * mean(H) (c = ent_coef / n), and dL/d(each of head.own_parameters()).

    The members of a batched run (algo/fast/stacked.py) pass arrays with a leading member axis, [members, n, ...],
    and c as a [members, 1] column. A head whose maths is row by row (no parameters of its own) computes them as
    [members * n, ...] rows; one with parameters (`per_member`) takes them whole, its parameters [members, 1, ...].
    """

    per_member = False

    def __init__(self, head: ActionHead) -> None:
        self.head = head

    def sample(self, out: np.ndarray, noise: np.ndarray,
               mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if out.ndim > 2 and not self.per_member:
            lead = out.shape[:-1]
            actions, logp = self._sample(_rows(out), _rows(noise), None if mask is None else _rows(mask))
            return actions.reshape(*lead, *actions.shape[1:]), logp.reshape(lead)
        return self._sample(out, noise, mask)

    def log_prob_entropy(self, out: np.ndarray, actions: np.ndarray,
                         mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, Any]:
        if out.ndim > 2 and not self.per_member:
            lead = out.shape[:-1]
            logp, entropy, cache = self._log_prob_entropy(_rows(out), actions.reshape(-1, *actions.shape[len(lead):]),
                                                          None if mask is None else _rows(mask))
            return logp.reshape(lead), entropy.reshape(lead), cache
        return self._log_prob_entropy(out, actions, mask)

    def mode(self, out: np.ndarray) -> np.ndarray:
        """head.mode: the most likely actions (a Gaussian's mean), for deterministic evaluation."""
        if out.ndim > 2 and not self.per_member:
            actions = self._mode(_rows(out))
            return actions.reshape(*out.shape[:-1], *actions.shape[1:])
        return self._mode(out)

    def grad(self, cache: Any, actions: np.ndarray, g_logp: np.ndarray,
             c: Any) -> tuple[np.ndarray, list[np.ndarray]]:
        if g_logp.ndim > 1 and not self.per_member:
            lead = g_logp.shape
            g_out, g_params = self._grad(cache, actions.reshape(-1, *actions.shape[len(lead):]), g_logp.reshape(-1),
                                         np.broadcast_to(c, lead).reshape(-1, 1))
            return g_out.reshape(*lead, -1), g_params
        return self._grad(cache, actions, g_logp, c)

    def _sample(self, out: np.ndarray, noise: np.ndarray,
                mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _mode(self, out: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _log_prob_entropy(self, out: np.ndarray, actions: np.ndarray,
                          mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, Any]:
        raise NotImplementedError

    def _grad(self, cache: Any, actions: np.ndarray, g_logp: np.ndarray,
              c: Any) -> tuple[np.ndarray, list[np.ndarray]]:
        raise NotImplementedError


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1])


class NumpyMultiCategorical(NumpyHead):
    head: MultiCategorical

    def __init__(self, head: MultiCategorical) -> None:
        super().__init__(head)
        self.splits = np.cumsum(head.nvec)[:-1]

    def _segments(self, out: np.ndarray) -> list[np.ndarray]:
        return [out] if len(self.head.nvec) == 1 else np.split(out, self.splits, axis=1)

    @staticmethod
    def _masked(out: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        return out if mask is None else np.where(mask, out, np.finfo(out.dtype).min)

    def _columns(self, actions: np.ndarray) -> np.ndarray:
        return actions

    def _stack(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.stack(parts, axis=1)

    def _sample(self, out: np.ndarray, noise: np.ndarray,
                mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(out.shape[0])
        actions, logp = [], None
        masks = self._segments(mask) if mask is not None else [None] * len(self.head.nvec)
        for j, (logits, m) in enumerate(zip(self._segments(self._masked(out, mask)), masks, strict=True)):
            shifted = logits - _by_row(np.maximum, logits)
            exp = np.exp(shifted)
            total = _by_row(np.add, exp)
            cdf = _cumsum(exp / total)
            drawn = _by_row(np.add, noise[:, j:j + 1] > cdf, np.intp)[:, 0]  # clamped as MultiCategorical.sample says
            if m is None:
                action = np.minimum(drawn, logits.shape[1] - 1)
            else:
                action = np.clip(drawn, m.argmax(axis=1), logits.shape[1] - 1 - m[:, ::-1].argmax(axis=1))
            lp = (shifted - np.log(total))[rows, action]
            logp = lp if logp is None else logp + lp
            actions.append(action)
        return self._stack(actions), logp.astype(np.float32, copy=False)  # type: ignore[union-attr]

    def _mode(self, out: np.ndarray) -> np.ndarray:
        return self._stack([logits.argmax(axis=1) for logits in self._segments(out)])

    def _log_prob_entropy(self, out: np.ndarray, actions: np.ndarray,
                          mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, Any]:
        n = out.shape[0]
        cols = self._columns(actions)
        logp, entropy, parts = np.zeros(n, np.float32), np.zeros(n, np.float32), []
        for j, logits in enumerate(self._segments(self._masked(out, mask))):
            shifted = logits - _by_row(np.maximum, logits)
            exp = np.exp(shifted)
            total = _by_row(np.add, exp)
            logp_all = shifted - np.log(total)
            p = exp / total
            h = -_by_row(np.add, p * logp_all)[:, 0]
            logp += logp_all[np.arange(n), cols[:, j]]
            entropy += h
            parts.append((p, logp_all, h))
        return logp, entropy, (parts, mask)

    def _grad(self, cache: Any, actions: np.ndarray, g_logp: np.ndarray,
              c: np.float32) -> tuple[np.ndarray, list[np.ndarray]]:
        # d logp / d logits = onehot(a) - p;  d(-c sum H)/d logits = c p (log p + H), per categorical
        col = g_logp[:, None]
        cols = self._columns(actions)
        rows = np.arange(len(g_logp))
        parts, mask = cache
        grads = []
        for j, (p, logp_all, h) in enumerate(parts):
            g = p * (c * (logp_all + h[:, None]) - col)
            g[rows, cols[:, j]] += g_logp
            grads.append(g)
        g_out = grads[0] if len(grads) == 1 else np.concatenate(grads, axis=1)
        if mask is not None:  # torch.where passes no gradient to the forbidden logits
            g_out = np.where(mask, g_out, np.float32(0.0))
        return g_out, []


class NumpyCategorical(NumpyMultiCategorical):
    """Actions stored as scalars: one column."""

    def _columns(self, actions: np.ndarray) -> np.ndarray:
        return actions[:, None]

    def _stack(self, parts: list[np.ndarray]) -> np.ndarray:
        return parts[0]


class NumpyBernoulli(NumpyHead):
    def _mode(self, out: np.ndarray) -> np.ndarray:
        return (out > 0).astype(np.float32)

    def _sample(self, out: np.ndarray, noise: np.ndarray,
                mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        p1 = np.exp(-np.logaddexp(0.0, -out, dtype=np.float32))
        actions = (noise < p1).astype(np.float32)
        return actions, self._log_prob_entropy(out, actions)[0]

    def _log_prob_entropy(self, out: np.ndarray, actions: np.ndarray,
                          mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, Any]:
        # log sigmoid(l) = -softplus(-l), computed without overflow for large |l|
        log_p1 = -np.logaddexp(0.0, -out, dtype=np.float32)
        log_p0 = log_p1 - out
        p1 = np.exp(log_p1)
        logp = (actions * out + log_p0).sum(axis=1)
        entropy = -(p1 * log_p1 + (1.0 - p1) * log_p0).sum(axis=1)
        return logp, entropy, (p1, out)

    def _grad(self, cache: Any, actions: np.ndarray, g_logp: np.ndarray,
              c: np.float32) -> tuple[np.ndarray, list[np.ndarray]]:
        # d logp / d l = a - p;  H = softplus(l) - p l, so d(-c sum H)/d l = c p (1 - p) l
        p1, logits = cache
        return g_logp[:, None] * (actions - p1) + c * p1 * (1.0 - p1) * logits, []


class NumpyDiagGaussian(NumpyHead):
    head: DiagGaussian
    per_member = True

    def __init__(self, head: DiagGaussian, log_std: np.ndarray | None = None) -> None:
        super().__init__(head)
        # [A], a view of the parameter; for a batch's members a [members, 1, A] view of their stacked copies.
        self.log_std = head.log_std.detach().numpy() if log_std is None else log_std

    def _sample(self, out: np.ndarray, noise: np.ndarray,
                mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        log_std = self.log_std
        actions = out + noise * np.exp(log_std)
        logp = (-0.5 * noise * noise).sum(axis=-1) - (log_std.sum(axis=-1) + np.float32(0.5 * LOG_2PI * out.shape[-1]))
        return actions, logp.astype(np.float32, copy=False)

    def _mode(self, out: np.ndarray) -> np.ndarray:
        return out

    def _log_prob_entropy(self, out: np.ndarray, actions: np.ndarray,
                          mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, Any]:
        log_std = self.log_std
        inv_std = np.exp(-log_std)
        z = (actions - out) * inv_std
        logp = (-0.5 * z * z).sum(axis=-1) - (log_std.sum(axis=-1) + np.float32(0.5 * LOG_2PI * out.shape[-1]))
        entropy = np.full(out.shape[:-1], (0.5 + 0.5 * LOG_2PI + log_std).sum(axis=-1), np.float32)
        return logp, entropy, (z, inv_std)

    def _grad(self, cache: Any, actions: np.ndarray, g_logp: np.ndarray,
              c: Any) -> tuple[np.ndarray, list[np.ndarray]]:
        z, inv_std = cache
        col = g_logp[..., None]
        g_log_std = (col * (z * z - 1.0)).sum(axis=-2) - c * g_logp.shape[-1]
        return col * z * inv_std, [g_log_std]


# Head class -> its numpy twin; by exact class, so a subclass of a head (maths of its own) is not covered.
ADAPTERS: dict[type[ActionHead], type[NumpyHead]] = {
    MultiCategorical: NumpyMultiCategorical, Categorical: NumpyCategorical, Bernoulli: NumpyBernoulli,
    DiagGaussian: NumpyDiagGaussian}


def numpy_head(head: ActionHead) -> NumpyHead | None:
    """The numpy twin of `head`, or None where there is none."""
    adapter = ADAPTERS.get(type(head))
    return None if adapter is None else adapter(head)  # type: ignore[arg-type]


# Below this many columns a reduction along a row runs as one elementwise op per column: the same result to the bit
# (numpy sums fewer than 8 elements one after another, and a maximum is exact), in a fraction of the time numpy's
# reduction machinery takes on rows this short (a 512 x 2 batch: 3 us instead of 21 for the max).
_SHORT = 8


def _by_row(op: np.ufunc, x: np.ndarray, dtype: Any = None) -> np.ndarray:
    """op.reduce over each row of [n, k] `x`, kept as [n, 1] (in `dtype` where given)."""
    k = x.shape[1]
    if k >= _SHORT or k == 1:
        return op.reduce(x, axis=1, keepdims=True, dtype=dtype)
    out = op(x[:, 0:1], x[:, 1:2], dtype=dtype)
    for j in range(2, k):
        op(out, x[:, j:j + 1], out=out)
    return out


def _cumsum(x: np.ndarray) -> np.ndarray:
    """np.cumsum(x, axis=1), column by column on short rows (see _by_row)."""
    if x.shape[1] >= _SHORT:
        return np.cumsum(x, axis=1)
    out = np.empty_like(x)
    out[:, 0] = x[:, 0]
    for j in range(1, x.shape[1]):
        np.add(out[:, j - 1], x[:, j], out=out[:, j])
    return out
