"""Statistics you can publish, over the seeds of a configuration: the protocol of Agarwal et al. (2021), "Deep
Reinforcement Learning at the Edge of the Statistical Precipice" (the rliable library), in numpy.

Scores are a matrix of runs x tasks (a sweep's seeds x its envs; one column for one env). The aggregates:

- IQM: the interquartile mean, the mean of the middle 50% of all scores (a 25% trimmed mean over runs and tasks,
  cut as scipy.stats.trim_mean cuts), robust to an outlier seed and more efficient than the median;
- mean and median of the per-task mean scores;
- optimality gap: how far the scores fall short of a target, target - mean(min(score, target));

each with a 95% stratified bootstrap confidence interval: every resample draws, for each task separately, as
many runs as it has, with replacement, and the interval is the 2.5 and 97.5 percentiles of the aggregate over
50,000 resamples. The probability of improvement P(X > Y) is the chance that a run of configuration X beats a
run of Y (ties count a half), averaged over tasks, with an interval from resampling both independently. A
performance profile is the fraction of runs scoring above each threshold tau.

tests/test_stats.py checks these against rliable's own figures.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

REPS = 50_000
CONFIDENCE = 0.95


def iqm(scores: np.ndarray) -> np.ndarray:
    """The interquartile mean over the last two axes (runs x tasks), for any leading axes (bootstrap resamples)."""
    flat = np.sort(scores.reshape(*scores.shape[:-2], -1), axis=-1)
    cut = int(0.25 * flat.shape[-1])
    return flat[..., cut:flat.shape[-1] - cut].mean(axis=-1)


def mean(scores: np.ndarray) -> np.ndarray:
    return scores.mean(axis=-2).mean(axis=-1)


def median(scores: np.ndarray) -> np.ndarray:
    return np.median(scores.mean(axis=-2), axis=-1)


def optimality_gap(target: float) -> Callable[[np.ndarray], np.ndarray]:
    def gap(scores: np.ndarray) -> np.ndarray:
        return target - np.minimum(scores, target).mean(axis=(-2, -1))
    return gap


def _resample(scores: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """reps stratified resamples of `scores` (runs x tasks): runs drawn with replacement within each task."""
    runs, tasks = scores.shape
    picks = rng.integers(0, runs, size=(reps, runs, tasks))
    return scores[picks, np.arange(tasks)]


def interval(scores: np.ndarray, stat: Callable[[np.ndarray], np.ndarray], reps: int = REPS, seed: int = 0,
             confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile bootstrap interval of stat(scores) over stratified resamples (a constant: both ends equal)."""
    estimates = _chunked(lambda n, rng: stat(_resample(scores, n, rng)), reps, seed)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return float(low), float(high)


def _chunked(draw: Callable[[int, np.random.Generator], np.ndarray], reps: int, seed: int,
             chunk: int = 10_000) -> np.ndarray:
    """draw(n, rng) for reps resamples, a chunk at a time: bounded memory for many runs and tasks."""
    rng = np.random.default_rng(seed)
    return np.concatenate([draw(min(chunk, reps - done), rng) for done in range(0, reps, chunk)])


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y) + P(X = Y) / 2 for a run of x against a run of y (runs x tasks each), averaged over tasks."""
    return float(_improvement(x[None], y[None])[0])


def _improvement(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # [..., runs_x, 1, tasks] against [..., 1, runs_y, tasks]: every pair of runs, per task.
    a, b = x[..., :, None, :], y[..., None, :, :]
    pairs = (a > b) + 0.5 * (a == b)
    return pairs.mean(axis=(-3, -2)).mean(axis=-1)


def improvement_interval(x: np.ndarray, y: np.ndarray, reps: int = REPS, seed: int = 0,
                         confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The bootstrap interval of probability_of_improvement, x and y resampled independently (each stratified)."""
    def draw(n: int, rng: np.random.Generator) -> np.ndarray:
        return _improvement(_resample(x, n, rng), _resample(y, n, rng))

    # Every resample compares all runs_x x runs_y pairs: chunks sized to about 20M comparisons at a time.
    pairs = x.shape[0] * y.shape[0] * x.shape[1]
    estimates = _chunked(draw, reps, seed, chunk=max(1, min(2_000, 20_000_000 // pairs)))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return float(low), float(high)


def performance_profile(scores: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """The fraction of runs scoring above each tau (averaged over tasks), over the last two axes."""
    above = scores[..., None] > taus  # [..., runs, tasks, taus]
    return above.mean(axis=-3).mean(axis=-2)


def profile_interval(scores: np.ndarray, taus: np.ndarray, reps: int = 2_000, seed: int = 0,
                     confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap bands of the performance profile, per tau."""
    estimates = _chunked(lambda n, rng: performance_profile(_resample(scores, n, rng), taus), reps, seed)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(estimates, [tail, 100 - tail], axis=0)
    return low, high


def summary(scores: np.ndarray, target: float | None = None, reps: int = REPS, seed: int = 0) -> dict[str, float]:
    """IQM, mean, median (and, with a target, the optimality gap) of runs x tasks scores, each with its interval:
    keys `iqm`, `iqm_low`, `iqm_high`, and so on."""
    stats: dict[str, Callable[[np.ndarray], np.ndarray]] = {"iqm": iqm, "mean": mean, "median": median}
    if target is not None:
        stats["optimality_gap"] = optimality_gap(target)
    out: dict[str, float] = {}
    for name, stat in stats.items():
        out[name] = float(stat(scores[None])[0])
        out[f"{name}_low"], out[f"{name}_high"] = interval(scores, stat, reps, seed)
    return out
