"""The training doctor (run/doctor.py, issue 34 item 2): each check fires on a crafted stream of statistics that
shows its symptom, once, and stays quiet on the same stream without it; a healthy CartPole run says nothing, and
result.json lists what a run was told."""

import json
import math
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from ppo_cli.config import DoctorConfig
from ppo_cli.run.doctor import Doctor

from .conftest import cli

TOTAL = 100 * 1000  # 100 updates of 1,000 steps


def _doctor(discrete=True, action_dims=1, normalize_reward=False, target_kl=None, normalize_obs=False, **settings):
    s = OmegaConf.merge(OmegaConf.structured(DoctorConfig), settings)
    algo = SimpleNamespace(total_timesteps=TOTAL, target_kl=target_kl, max_grad_norm=0.5, K_epochs=3)
    return Doctor(s, algo, discrete, action_dims, normalize_reward, normalize_obs)


HEALTHY = {"losses/epochs": 3.0, "losses/entropy": 0.69, "losses/approx_kl": 0.004, "losses/clip_fraction": 0.1,
           "losses/explained_variance": 0.6, "losses/grad_clipped": 0.3, "losses/grad_norm": 0.4,
           "losses/value_loss": 10.0, "charts/SPS": 10_000.0}


def _run(doctor, updates=100, change=None, returns=lambda u: [20.0 + 3 * u], length=20, evals=()):
    """Feed `updates` updates of HEALTHY statistics, changed by `change(update, scalars)`; the symptoms told."""
    told = []
    for u in range(updates):
        scalars = dict(HEALTHY)
        if change:
            change(u, scalars)
        rs = returns(u)
        told += doctor.update((u + 1) * 1000, scalars, rs, [length] * len(rs))
        for at, value in evals:
            if at == u:
                told += doctor.evaluation((u + 1) * 1000, value)
    return [w.symptom for w in told]


def test_a_healthy_stream_is_quiet():
    assert _run(_doctor()) == []


@pytest.mark.parametrize("symptom,change,kwargs", [
    ("entropy_collapse", lambda u, s: s.update({"losses/entropy": 0.69 * (0.05 if u >= 5 else 1.0)}), {}),
    ("entropy_collapse", lambda u, s: s.update({"losses/entropy": 1.4 - (3.0 if u >= 5 else 0.0)}),
     {"discrete": False, "action_dims": 1}),  # a Gaussian's std shrunk 20x: entropy down by log(20) = 3.0
    ("kl_high", lambda u, s: s.update({"losses/approx_kl": 0.2 if u >= 50 else 0.004}), {}),
    # with target_kl, the updater keeps the mean KL below 1.5 x target_kl: every update stopping early is the sign
    ("kl_high", lambda u, s: s.update({"losses/approx_kl": 0.02, "losses/epochs": 1.0}), {"target_kl": 0.02}),
    ("clip_fraction_high", lambda u, s: s.update({"losses/clip_fraction": 0.5 if u >= 50 else 0.1}), {}),
    ("value_not_learning", lambda u, s: s.update({"losses/explained_variance": -0.02}), {}),
    ("grad_always_clipped", lambda u, s: s.update({"losses/grad_clipped": 1.0, "losses/grad_norm": 30.0}), {}),
    ("value_loss_exploding", lambda u, s: s.update({"losses/value_loss": 10.0 * 2 ** u}), {}),
    ("sps_dropping", lambda u, s: s.update({"charts/SPS": 10_000.0 / (1 + u / 10)}), {}),
    ("obs_scale", lambda u, s: s.update({"charts/input_scale": 250.0}), {}),
])
def test_each_check_fires_once_on_its_symptom(symptom, change, kwargs):
    told = _run(_doctor(**kwargs), change=change)
    assert told.count(symptom) == 1, told


@pytest.mark.parametrize("symptom,change,kwargs", [
    # a collapse late in training is convergence, not a premature collapse
    ("entropy_collapse", lambda u, s: s.update({"losses/entropy": 0.69 * (0.05 if u >= 50 else 1.0)}), {}),
    # a Gaussian's entropy may be negative and fall a little: its std halves
    ("entropy_collapse", lambda u, s: s.update({"losses/entropy": -0.5 - (0.69 if u >= 5 else 0.0)}),
     {"discrete": False, "action_dims": 1}),
    ("kl_high", lambda u, s: s.update({"losses/approx_kl": 0.2 if u in (10, 11, 30) else 0.004}), {}),  # spikes
    ("kl_high", lambda u, s: s.update({"losses/epochs": 1.0 if u % 3 == 0 else 3.0}), {"target_kl": 0.02}),
    ("value_not_learning", lambda u, s: s.update({"losses/explained_variance": -0.02 if u < 15 else 0.5}), {}),
    # CartPole's first dozen updates clip every step: a streak, not a tenth of the run, is not "always"
    ("grad_always_clipped", lambda u, s: s.update({"losses/grad_clipped": 1.0 if u < 9 else 0.4}),
     {"patience_long": 5}),
    ("value_loss_exploding", lambda u, s: s.update({"losses/value_loss": 10.0 if u < 50 else 0.001}), {}),
    ("sps_dropping", lambda u, s: s.update({"charts/SPS": 2000.0 if u == 0 else 10_000.0}), {}),
    ("obs_scale", lambda u, s: s.update({"charts/input_scale": 250.0}), {"normalize_obs": True}),
    ("obs_scale", lambda u, s: s.update({"charts/input_scale": 0.8}), {}),
])
def test_each_check_stays_quiet_without_its_symptom(symptom, change, kwargs):
    assert symptom not in _run(_doctor(**kwargs), change=change)


def test_an_entropy_that_collapses_late_is_told_where_the_returns_never_improved():
    """MountainCar with ent_coef 0: the entropy falls from 1.1 to 0.03 between 30% and 50% of training, the return
    stuck at -200 throughout."""
    collapse = lambda u, s: s.update({"losses/entropy": 1.1 if u < 30 else 0.03})  # noqa: E731
    told = _run(_doctor(), change=collapse, returns=lambda u: [-200.0])
    assert "entropy_collapse" in told and told.index("returns_flat") < told.index("entropy_collapse")
    assert "entropy_collapse" not in _run(_doctor(), change=collapse)  # the returns improved: convergence


def test_returns_flat_and_reward_scale_and_eval_below_train():
    assert _run(_doctor(), returns=lambda u: [20.0 + (u % 3)]) == ["returns_flat"]
    assert _run(_doctor(), returns=lambda u: [] if u % 2 else [-200.0 + 4 * u]) == []  # improving, with gaps
    told = _run(_doctor(), returns=lambda u: [5e4 * 20])  # 20 steps an episode
    assert told[0] == "reward_scale"
    assert "reward_scale" not in _run(_doctor(normalize_reward=True), returns=lambda u: [5e4 * 20])
    # evaluations far below the training returns, twice in a row; once is noise
    assert "eval_below_train" in _run(_doctor(), evals=[(40, 10.0), (60, 12.0)])
    assert "eval_below_train" not in _run(_doctor(), evals=[(40, 10.0), (60, 250.0)])
    assert "eval_below_train" not in _run(_doctor(), evals=[(40, 140.0), (60, 200.0)])


def test_warnings_name_symptom_step_cause_and_knob_and_can_be_turned_off():
    doctor = _doctor()
    _run(doctor, change=lambda u, s: s.update({"losses/approx_kl": 0.2}))
    w = doctor.warnings[0]
    assert w.symptom == "kl_high" and w.step == 3000
    assert w.message.startswith("doctor: kl_high at step 3,000: approx_kl 0.2 above 0.05 for 3 updates") and (
        "algo.lr_actor" in w.message)
    assert w.as_dict() == {"symptom": "kl_high", "step": 3000, "message": w.message}
    assert _run(_doctor(enabled=False), change=lambda u, s: s.update({"losses/approx_kl": 0.2})) == []


@pytest.mark.slow  # each check on its symptom and quiet without it: the stream tests above
def test_a_healthy_cartpole_run_is_quiet_and_a_broken_one_is_told(tmp_path):
    """The seed defaults say nothing (60k steps); a learning rate of 0.1 is told as it happens, in result.json and in
    TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # On gymnasium's sync envs: the broken run's trajectory (seed 0, lr 0.1) is the one this test was written on.
    common = ["algo.total_timesteps=60000", "eval.every_steps=0", "eval.episodes=2", "checkpoint_interval=0",
              "env.vectorization=sync"]
    proc = cli("ppo-train", *common, f"hydra.run.dir={tmp_path / 'ok'}", cwd=tmp_path)
    assert proc.returncode == 0 and "doctor" not in proc.stdout, proc.stdout
    assert json.loads((tmp_path / "ok" / "result.json").read_text())["warnings"] == []
    proc = cli("ppo-train", *common, "algo.lr_actor=0.1", "algo.lr_critic=0.1", f"hydra.run.dir={tmp_path / 'lr'}",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warnings = json.loads((tmp_path / "lr" / "result.json").read_text())["warnings"]
    symptoms = [w["symptom"] for w in warnings]
    assert "kl_high" in symptoms, warnings
    assert f"warning: {warnings[0]['message']}" in proc.stdout and "doctor:     " in proc.stdout
    acc = EventAccumulator(str(next((tmp_path / "lr").glob("events.out.tfevents.*"))))
    acc.Reload()
    assert f"doctor/{symptoms[0]}/text_summary" in acc.Tags()["tensors"]
    assert all(math.isfinite(w["step"]) for w in warnings)


def test_the_doctors_state_goes_into_checkpoints_as_plain_data():
    """A resumed run keeps what was told (result.json lists it, nothing is told twice) and the baselines its checks
    compare with (returns_flat must not compare a solved run with its own solved start)."""
    doctor = _doctor()
    _run(doctor, updates=40, change=lambda u, s: s.update({"losses/approx_kl": 0.2}))
    state = json.loads(json.dumps(doctor.state()))  # plain data: what a weights_only checkpoint can hold
    resumed = _doctor()
    resumed.load(state)
    assert resumed.state() == doctor.state() and [w.symptom for w in resumed.warnings] == ["kl_high"]
    more = [w.symptom for w in resumed.update(41_000, dict(HEALTHY, **{"losses/approx_kl": 0.2}), [140.0], [20])]
    assert more == []  # told once, before the checkpoint
    fresh = _doctor()
    fresh.load(None)  # a checkpoint from before the doctor
    assert fresh.warnings == [] and fresh.first_returns == []
