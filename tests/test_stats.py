"""Statistics over seeds (cli/stats.py, issue 34 item 3) against rliable's own figures, and ppo-sweep-report's
aggregate.csv, improvement.csv and plots from a sweep's result.json files."""

import csv
import json

import numpy as np
import pytest

from ppo_cli.cli import stats
from ppo_cli.cli.sweep_report import report

# rliable 1.2.0 (arch 7.2.0) on these scores, 50,000 resamples: get_interval_estimates with aggregate_iqm,
# aggregate_mean, aggregate_median and aggregate_optimality_gap(gamma=250); probability_of_improvement(B, A) with
# its interval over 2,000 resamples; create_performance_profile of A at taus linspace(100, 300, 5), 2,000 resamples.
RS = np.random.RandomState(0)
A, B = RS.normal(200, 60, size=(10, 3)), RS.normal(230, 40, size=(8, 3))
RLIABLE = {
    "iqm": {"A": (228.5767, 207.493, 253.166), "B": (212.5689, 196.5, 230.115)},
    "mean": {"A": (226.5714, 204.72, 247.81), "B": (215.9038, 201.072, 231.225)},
    "median": {"A": (223.7895, 193.583, 255.899), "B": (208.654, 196.57, 233.162)},
    "optimality_gap": {"A": (38.8673, 23.79, 55.558), "B": (39.3644, 27.632, 51.321)},
}
PROFILE = [0.96666667, 0.86666667, 0.7, 0.36666667, 0.13333333]
PROFILE_LOW = [0.9, 0.73333333, 0.53333333, 0.2, 0.03333333]
PROFILE_HIGH = [1.0, 0.96666667, 0.86666667, 0.53333333, 0.26666667]


@pytest.mark.parametrize("metric", list(RLIABLE))
def test_aggregates_and_intervals_match_rliable(metric):
    """Point estimates exactly; intervals to within the bootstrap's own noise at 50,000 resamples (a percent of
    the interval's width: two runs of rliable with other seeds differ as much)."""
    for name, scores in (("A", A), ("B", B)):
        point, low, high = RLIABLE[metric][name]
        got = stats.summary(scores, target=250.0)
        assert got[metric] == pytest.approx(point, abs=1e-4)
        width = high - low
        assert abs(got[f"{metric}_low"] - low) < 0.02 * width and abs(got[f"{metric}_high"] - high) < 0.02 * width


def test_probability_of_improvement_and_profiles_match_rliable():
    assert stats.probability_of_improvement(B, A) == pytest.approx(0.425)
    low, high = stats.improvement_interval(B, A, reps=2000)
    assert abs(low - 0.27916667) < 0.03 and abs(high - 0.575) < 0.03
    taus = np.linspace(100, 300, 5)
    np.testing.assert_allclose(stats.performance_profile(A[None], taus)[0], PROFILE, atol=1e-6)
    low, high = stats.profile_interval(A, taus)
    np.testing.assert_allclose(low, PROFILE_LOW, atol=0.04)
    np.testing.assert_allclose(high, PROFILE_HIGH, atol=0.04)


def test_against_rliable_itself_where_it_is_installed():
    rly = pytest.importorskip("rliable.library")
    metrics = pytest.importorskip("rliable.metrics")
    point, ci = rly.get_interval_estimates({"A": A}, lambda s: np.array([metrics.aggregate_iqm(s)]), reps=20_000)
    got = stats.summary(A, reps=20_000)
    assert got["iqm"] == pytest.approx(float(point["A"][0]))
    width = ci["A"][1, 0] - ci["A"][0, 0]
    assert abs(got["iqm_low"] - ci["A"][0, 0]) < 0.03 * width and abs(got["iqm_high"] - ci["A"][1, 0]) < 0.03 * width


def test_hand_computed_cases():
    # IQM of 1..8: the middle half, 3..6 -> 4.5 (25% trimmed as scipy.stats.trim_mean trims).
    assert stats.iqm(np.arange(1.0, 9.0).reshape(8, 1)[None])[0] == pytest.approx(4.5)
    # A run of [3, 4] against a run of [1, 3]: pairs 3>1, 3=3 (a half), 4>1, 4>3 -> 3.5 / 4.
    assert stats.probability_of_improvement(np.array([[3.0], [4.0]]), np.array([[1.0], [3.0]])) == 0.875
    # Equal scores: a point interval.
    assert stats.interval(np.full((5, 1), 7.0), stats.iqm) == (7.0, 7.0)
    # The optimality gap: 500 - mean(min(score, 500)).
    assert stats.optimality_gap(500.0)(np.array([[[400.0], [600.0]]]))[0] == pytest.approx(50.0)


def _job(folder, name, overrides, objective):
    path = folder / name
    path.mkdir(parents=True)
    (path / "result.json").write_text(json.dumps({"status": "ok", "objective": objective, "global_step": 1000,
                                                  "wall_time": 1.0, "overrides": overrides}))


def test_the_sweep_report_writes_the_statistics_over_seeds(tmp_path):
    """Two clip ranges x 5 seeds, read from result.json as a sweep leaves them: aggregate.csv has a row per
    configuration with iqm, iqm_low, iqm_high (...), improvement.csv the probability that the better one wins."""
    sweep = tmp_path / "sweep"
    good, bad = [480.0, 500.0, 470.0, 495.0, 30.0], [200.0, 250.0, 180.0, 220.0, 260.0]
    for seed in range(5):
        _job(sweep, str(seed), ["algo.clip_range=0.2", f"seed={seed}"], good[seed])
        _job(sweep, str(5 + seed), ["algo.clip_range=0.1", f"seed={seed}"], bad[seed])
    report(sweep, target=500.0, reps=5_000)
    rows = list(csv.DictReader(open(sweep / "aggregate.csv")))
    assert [r["algo.clip_range"] for r in rows] == ["0.2", "0.1"] and [r["runs"] for r in rows] == ["5", "5"]
    first = rows[0]
    assert float(first["iqm"]) == pytest.approx((480 + 495 + 470) / 3)  # the outlier seed (30) trimmed
    assert float(first["mean"]) == pytest.approx(sum(good) / 5)
    assert float(first["iqm_low"]) <= float(first["iqm"]) <= float(first["iqm_high"])
    assert float(first["optimality_gap"]) == pytest.approx(500 - sum(good) / 5)
    (pair,) = list(csv.DictReader(open(sweep / "improvement.csv")))
    assert pair["x"] == "clip_range=0.2" and pair["y"] == "clip_range=0.1"
    assert float(pair["probability"]) == pytest.approx(20 / 25)  # 4 good seeds beat all 5; the outlier none
    assert (sweep / "aggregate.png").stat().st_size > 1000 and (sweep / "profiles.png").stat().st_size > 1000


def test_configurations_are_named_short_where_that_keeps_them_apart():
    from ppo_cli.cli.seed_report import _names

    tuned = [{"params": {"algo.lr_actor": "0.00012345678912345"}}, {"params": {"algo.lr_actor": "0.1"}}]
    assert _names(tuned, ["algo.lr_actor"]) == ["lr_actor=0.0001235", "lr_actor=0.1"]
    close = [{"params": {"algo.lr_actor": "0.00012345678912345"}}, {"params": {"algo.lr_actor": "0.00012345678999"}}]
    assert _names(close, ["algo.lr_actor"]) == ["lr_actor=0.00012345678912345", "lr_actor=0.00012345678999"]
