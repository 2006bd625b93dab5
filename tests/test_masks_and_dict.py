"""Action masking (masks.py, the categorical heads) and Dict observations (observations.py)."""

import math

import numpy as np
import pytest
import torch

from ppo_cli.algo.fast.core import NumpyActor, NumpyLoss, covers
from ppo_cli.algo.fast.heads import numpy_head
from ppo_cli.algo.rollout import TorchActor
from ppo_cli.algo.update import UpdateSettings, minibatch_loss
from ppo_cli.policy.actor_critic import ActorCritic
from ppo_cli.policy.heads import Categorical, MultiCategorical
from tests.conftest import TINY, check_resume_is_bitwise, cli, make_cfg

MASKED_GRID = ["env=MaskedGrid-v0"]


def test_masked_entropy_and_log_prob_match_a_hand_computation():
    head = Categorical({"type": "Discrete", "n": 4})
    out = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[True, False, True, False]])
    p = np.exp([1.0, 3.0]) / np.exp([1.0, 3.0]).sum()  # only actions 0 and 2 count
    logp, entropy = head.log_prob_entropy(out, torch.tensor([2]), mask)
    assert float(entropy) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6)
    assert float(logp) == pytest.approx(math.log(p[1]), rel=1e-6)
    n_logp, n_entropy, _ = numpy_head(head).log_prob_entropy(out.numpy(), np.array([2]), mask.numpy())
    assert n_entropy[0] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6)
    assert n_logp[0] == pytest.approx(math.log(p[1]), rel=1e-6)
    assert int(head.mode(out, mask)[0]) == 2  # the best allowed, not the best overall (3)


@pytest.mark.parametrize("twin", ["torch", "numpy"])
def test_no_masked_action_is_ever_sampled(twin):
    """100,000 draws with random masks, the forbidden actions given the largest logits."""
    rng = np.random.default_rng(0)
    n = 100_000
    head = MultiCategorical({"type": "MultiDiscrete", "nvec": [5, 3], "start": [0, 0], "shape": [2]})
    mask = rng.random((n, 8)) < 0.4
    mask[np.arange(n), rng.integers(0, 5, n)] = True  # at least one allowed value per component
    mask[np.arange(n), 5 + rng.integers(0, 3, n)] = True
    out = np.where(mask, rng.normal(0, 1, (n, 8)), 30.0).astype(np.float32)
    noise = head.noise(np.random.default_rng(1), n)
    if twin == "torch":
        actions = head.sample(torch.from_numpy(out), torch.from_numpy(noise), torch.from_numpy(mask)).numpy()
    else:
        actions, _ = numpy_head(head).sample(out, noise, mask)
    assert mask[np.arange(n), actions[:, 0]].all() and mask[np.arange(n), 5 + actions[:, 1]].all()
    # the last allowed value is reachable: the inverse-CDF guard stops at it, not at the last value
    only_first = np.zeros((1, 8), bool)
    only_first[0, [0, 5]] = True
    a, _ = numpy_head(head).sample(np.zeros((1, 8), np.float32), np.full((1, 2), 0.9999999, np.float32), only_first)
    assert a.tolist() == [[0, 0]]


@pytest.mark.parametrize("twin", ["torch", "numpy"])
def test_a_noise_of_exactly_zero_takes_the_first_allowed_action(twin):
    """Issue 30, item 8: with the leading actions masked their cdf is 0, and a noise of exactly 0.0 (one float32 draw
    in 2^24) was below no cdf: action 0, masked, with a log-prob of -3.4e38."""
    cases = [(Categorical({"type": "Discrete", "n": 4}), [[False, False, True, True]], [0.0], [2]),
             (MultiCategorical({"type": "MultiDiscrete", "nvec": [3, 3], "start": [0, 0], "shape": [2]}),
              [[False, True, True, False, False, True]], [0.0, 0.0], [1, 2])]
    for head, mask, noise, expected in cases:
        mask = np.array(mask)
        out = np.zeros(mask.shape, np.float32)
        noise = np.array([noise], np.float32)
        if twin == "torch":
            action = head.sample(torch.from_numpy(out), torch.from_numpy(noise), torch.from_numpy(mask))
            logp, _ = head.log_prob_entropy(torch.from_numpy(out), action, torch.from_numpy(mask))
            action, logp = action.numpy(), logp.numpy()
        else:
            action, logp = numpy_head(head).sample(out, noise, mask)
        assert np.asarray(action).reshape(-1).tolist() == expected
        assert np.isfinite(logp).all() and float(logp[0]) > -10


def _rollout_batch(tmp_path):
    from ppo_cli.run.runner import Runner

    trainer = Runner(make_cfg(*TINY, *MASKED_GRID, "eval.final=false", "eval.objective=train"), tmp_path)
    from ppo_cli.algo.rollout import collect

    collected = collect(trainer.envs, trainer.algo.actor, trainer.algo.buffer, trainer.algo.obs, None, lambda: False,
                        trainer.clock, trainer.algo.masks, trainer.algo.mask)
    assert collected.complete
    with torch.no_grad():
        batch = trainer.algo.buffer.advantages(torch.zeros(2), 0.99, 0.9)
    return trainer, batch


def test_masks_are_stored_and_the_first_epoch_ratio_is_one(tmp_path):
    trainer, batch = _rollout_batch(tmp_path)
    assert batch.masks is not None and batch.masks.dtype == torch.bool and batch.masks.shape == (128, 4)
    assert not batch.masks.all()  # walls were met
    assert batch.masks[torch.arange(128), batch.actions].all()  # every stored action was allowed
    with torch.no_grad():
        logp, _, _ = trainer.algo.policy.evaluate(batch.obs, batch.actions, batch.masks)
    torch.testing.assert_close(logp, batch.logp, rtol=1e-5, atol=1e-6)
    s = UpdateSettings(0.1, None, 0.01, 0.5, 0.5, 1, 128, True, None)
    _, stats = minibatch_loss(trainer.algo.policy, batch, s)
    assert abs(float(stats[3])) < 1e-6 and float(stats[4]) == 0.0  # approx_kl 0, nothing clipped
    trainer.close()


def test_numpy_loss_with_masks_equals_autograd(tmp_path):
    trainer, batch = _rollout_batch(tmp_path)
    policy = trainer.algo.policy
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    batch.advantages = torch.randn(len(batch))
    s = UpdateSettings(0.1, None, 0.01, 0.5, 0.5, 1, 128, True, None)
    loss, ref_stats = minibatch_loss(policy, batch, s)
    policy.zero_grad(set_to_none=True)
    loss.backward()
    ref = {name: p.grad.clone() for name, p in policy.named_parameters()}
    fast = NumpyLoss(policy, covers(policy)[0])
    stats = fast.loss_and_grads(batch.obs.numpy(), batch.actions.numpy(), batch.logp.numpy(), batch.values.numpy(),
                                batch.advantages.numpy(), batch.returns.numpy(), 0.1, None, 0.01, 0.5, True,
                                batch.masks.numpy())
    np.testing.assert_allclose(stats, ref_stats.numpy(), rtol=1e-5, atol=1e-6)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-4, atol=1e-6, msg=name)
    trainer.close()


@pytest.mark.slow  # learning; the masking maths has fast tests
def test_masked_grid_is_solved_and_evaluated_with_masks(tmp_path):
    """The env raises on a masked action: training, periodic evaluation, ppo-eval and its random baseline all
    run through it, so none took one. The masked policy finds the 20-move path (return 0.81)."""
    run = tmp_path / "run"
    cli("ppo-train", *MASKED_GRID, "algo.total_timesteps=65536", "eval.every_steps=32768",
        f"hydra.run.dir={run}", cwd=tmp_path, check=True)
    out = cli("ppo-eval", str(run / "checkpoints" / "checkpoint.pt"), "--json", cwd=tmp_path, check=True)
    import json

    result = json.loads(out.stdout)
    assert result["mean_return"] == pytest.approx(0.81, abs=1e-6)
    assert result["random_mean_return"] < 0.0


def test_resume_with_masks_is_bitwise(tmp_path):
    base = [*TINY, *MASKED_GRID, "eval.final=false", "eval.objective=train", "checkpoint_interval=1"]
    data = check_resume_is_bitwise(base, tmp_path, total=384, split=128)
    assert data["last_mask"] is not None and data["last_mask"].shape == (2, 4)


def test_multidiscrete_masks_from_a_dict_key(tmp_path):
    """MaskedDigits gives the mask as an observation key (not network input) and raises on a masked action."""
    from ppo_cli.run.runner import Runner

    trainer = Runner(make_cfg(*TINY, "env.entry_point=tests.custom_env:MaskedDigits", "eval.every_steps=128"),
                      tmp_path)
    assert trainer.algo.masks.source == "observation"
    assert trainer.algo.policy.layout.dim == 2  # the observation key only
    result = trainer.run()
    trainer.close()
    assert result.final_eval.mean_return == 2.0


def test_dict_observations_train_exactly_as_the_keys_concatenated_by_hand(tmp_path):
    """GoalReach's Dict and the same env through FlattenObservation give the same network input, so the same run."""
    from ppo_cli.run.runner import Runner

    runs = []
    for extra in ([], ["env.wrappers=[{_target_: gymnasium.wrappers.FlattenObservation}]"]):
        trainer = Runner(make_cfg(*TINY, "env=GoalReach-v0", "eval.final=false", "eval.objective=train", *extra),
                          tmp_path / str(len(runs)))
        trainer.run()
        trainer.close()
        runs.append(trainer)
    assert runs[0].algo.obs_space["type"] == "Dict" and runs[1].algo.obs_space["type"] == "Box"
    for a, b in zip(runs[0].algo.policy.parameters(), runs[1].algo.policy.parameters(), strict=True):
        assert torch.equal(a, b)


def test_dict_inputs_are_the_same_in_both_twins_with_normalization():
    space = {"type": "Dict", "spaces": {"a": {"type": "Box", "shape": [2, 2]}, "b": {"type": "Discrete", "n": 3},
                                        "c": {"type": "MultiBinary", "shape": [2]},
                                        "d": {"type": "MultiDiscrete", "shape": [2], "nvec": [2, 3], "start": [0, 1]},
                                        "e": {"type": "Box", "shape": [1]}}}
    policy = ActorCritic(space, {"type": "Discrete", "n": 2}, [8], normalize_obs=True)
    rng = np.random.default_rng(0)
    obs = {"a": rng.normal(2, 3, (5, 2, 2)), "b": rng.integers(0, 3, 5), "c": rng.integers(0, 2, (5, 2)),
           "d": np.stack([rng.integers(0, 2, 5), rng.integers(1, 4, 5)], 1), "e": rng.normal(0, 1, (5, 1))}
    t = TorchActor(policy, np.random.default_rng(0), torch.device("cpu")).inputs(obs)
    policy.obs_norm.load_state_dict({"mean": torch.zeros(5, dtype=torch.float64),
                                     "var": torch.ones(5, dtype=torch.float64),
                                     "count": torch.tensor(1e-8, dtype=torch.float64)})
    n = NumpyActor(policy, "tanh", np.random.default_rng(0)).inputs(obs)
    np.testing.assert_array_equal(t.numpy(), n)
    assert n.shape == (5, 4 + 1 + 3 + 2 + 5)  # Box parts (a, e) first, then one-hot b, binary c, one-hot d
    np.testing.assert_array_equal(n[:, 5:8], np.eye(3)[obs["b"]])
    assert policy.obs_norm.mean.shape == (5,)  # statistics of the Box parts only


@pytest.mark.parametrize("args,fragment", [
    (["env.entry_point=tests.custom_env:BadMask", "env.kwargs.kind=shape"],
     "the action mask at step 6 has shape (3,) per env; expected (2,)"),
    (["env.entry_point=tests.custom_env:BadMask", "env.kwargs.kind=dtype"],
     "the action mask at step 6 must be booleans or 0/1"),
    (["env.entry_point=tests.custom_env:BadMask", "env.kwargs.kind=empty"],
     "the action mask of env 0 at step 6 allows no action"),
    (["env.entry_point=tests.custom_env:TextObs"], "observation key 'note' has space Text"),
    (["env.entry_point=tests.custom_env:MissionCorridor"],
     "which is not supported inside a Dict (supported: Box, Discrete, MultiDiscrete, MultiBinary); keep the "
     "others with env.obs_keys=[pos]"),
    (["env.entry_point=tests.custom_env:MissionCorridor", "env.obs_keys=[pos,goal]"],
     "env.obs_keys=['pos', 'goal']: the observation has no key 'goal' (it has 'mission', 'pos')"),
    (["env.obs_keys=[pos]"], "env.obs_keys=['pos']: selects keys of a Dict observation; this env's observation space "
                             "is Box("),
])
def test_bad_masks_and_dict_keys_are_one_line(tmp_path, args, fragment):
    proc = cli("ppo-train", *TINY, *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr


def test_obs_keys_drop_a_key_ppo_cli_cannot_read(tmp_path):
    """Issue 30, item 15: MiniGrid's Dict observation carries a Text `mission`; env.obs_keys keeps the rest."""
    proc = cli("ppo-train", *TINY, "env.entry_point=tests.custom_env:MissionCorridor", "env.obs_keys=[pos]",
               f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = torch.load(tmp_path / "r" / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert data["observation_space"] == {"type": "Dict", "spaces": {"pos": {"type": "Box", "shape": [1]}}}
