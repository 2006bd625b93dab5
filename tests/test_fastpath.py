"""The hand-written numpy loss and gradients (fast.core.NumpyLoss) and rollout forward pass (fast.core.NumpyActor)
against autograd and the torch policy on the same inputs."""

import numpy as np
import pytest
import torch

from ppo_cli.algo.fast.core import NumpyActor, NumpyLoss, covers
from ppo_cli.algo.storage import Batch
from ppo_cli.algo.update import AutogradGradients, Updater, UpdateSettings, make_optimizer, minibatch_loss
from ppo_cli.policy.actor_critic import ActorCritic

OBS = {"type": "Box", "shape": [5]}
SPACES = {"Discrete": {"type": "Discrete", "n": 3},
          "Box": {"type": "Box", "shape": [2], "low": [-1.0, -1.0], "high": [1.0, 1.0]},
          "MultiDiscrete": {"type": "MultiDiscrete", "shape": [3], "nvec": [2, 4, 3], "start": [0, 0, 0]},
          "MultiBinary": {"type": "MultiBinary", "shape": [4]}}


def _setup(kind, activation, widths=(16, 8), seed=0, shared_trunk=False):
    torch.manual_seed(seed)
    policy = ActorCritic(OBS, SPACES[kind], list(widths), activation, "orthogonal", shared_trunk=shared_trunk,
                         log_std_init=-0.3)
    for p in policy.parameters():  # move away from the init so every gradient is non-trivial
        p.data.add_(0.3 * torch.randn_like(p))
    n = 64
    x = torch.randn(n, 5)
    with torch.no_grad():
        actions, logp, values = policy.act(x, np.random.default_rng(seed))
        # Old log-probs off by up to +-0.3: ratios inside and outside the clip range, both signs of advantage.
        old_logp = logp + 0.3 * (2 * torch.rand(n) - 1)
        # Old values off by N(0, 0.3): value changes inside and outside a clip_range_vf of 0.2.
        old_values = values + 0.3 * torch.randn(n)
    batch = Batch(x, actions, old_logp, old_values, torch.randn(n), values + torch.randn(n))
    return policy, batch


def _numpy_loss(fast, mb, s):
    return fast.loss_and_grads(mb.obs.numpy(), mb.actions.numpy(), mb.logp.numpy(), mb.values.numpy(),
                               mb.advantages.numpy(), mb.returns.numpy(), s.clip_range, s.clip_range_vf, s.ent_coef,
                               s.vf_coef, s.normalize_advantage)


VARIANTS = {  # (shared_trunk, clip_range_vf, normalize_advantage)
    "separate": (False, None, True), "unnormalized": (False, None, False), "shared": (True, None, True),
    "clip_vf": (False, 0.2, True), "shared_clip_vf": (True, 0.2, False)}


@pytest.mark.parametrize("kind", list(SPACES))
@pytest.mark.parametrize("activation", ["tanh", "relu", "leaky_relu"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_equal_autograd(kind, activation, variant):
    shared, clip_vf, normalize = VARIANTS[variant]
    policy, mb = _setup(kind, activation, shared_trunk=shared)
    s = UpdateSettings(0.1, clip_vf, 0.01, 0.5, 0.5, 1, 64, normalize, None)
    loss, ref_stats = minibatch_loss(policy, mb, s)
    policy.zero_grad(set_to_none=True)
    loss.backward()
    ref = {name: p.grad.clone() for name, p in policy.named_parameters()}
    assert 0.05 < float(ref_stats[4]) < 0.95  # some ratios clipped, some not: both gradient branches run
    if clip_vf is not None:  # both branches of the clipped value loss run too
        moved = (policy.evaluate(mb.obs, mb.actions)[2] - mb.values).abs().detach()
        assert (moved > clip_vf).any() and (moved < clip_vf).any()
    fast = NumpyLoss(policy, covers(policy)[0])
    fast.flat_grad.fill(np.nan)  # every gradient must be written, not accumulated
    stats = _numpy_loss(fast, mb, s)
    np.testing.assert_allclose(stats, ref_stats.numpy(), rtol=1e-5, atol=1e-6)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", ["separate", "shared_clip_vf"])
def test_full_update_matches_autograd_update(variant):
    shared, clip_vf, normalize = VARIANTS[variant]
    s = UpdateSettings(0.1, clip_vf, 0.01, 0.5, 0.5, 3, 16, normalize, None)
    results = []
    for fast in (False, True):  # autograd + optimizer.step(), against NumpyLoss + FusedAdamStep
        policy, batch = _setup("Discrete", "tanh", shared_trunk=shared)
        opt = make_optimizer(policy, "adam", 3e-4, 1e-3, 1e-5, 0.0)
        updater, _ = Updater.build(policy, opt, torch.Generator().manual_seed(0), fast_update=fast)
        assert isinstance(updater.gradients, AutogradGradients) != fast
        stats = updater.update(batch, s)
        results.append((stats, [p.detach().clone() for p in policy.parameters()]))
    (ref_stats, ref_params), (stats, params) = results
    for a, b in zip(ref_params, params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert stats == pytest.approx(ref_stats, rel=1e-4, abs=1e-6)


def test_unsupported_cases_fall_back_to_autograd():
    assert covers(ActorCritic(OBS, SPACES["Discrete"], [8]).double())[0] is None
    assert covers(torch.nn.Linear(5, 3))[0] is None
    assert covers(ActorCritic(OBS, SPACES["Discrete"], [8], shared_trunk=True))[0] == "tanh"


@pytest.mark.parametrize("kind", list(SPACES))
@pytest.mark.parametrize("activation", ["tanh", "relu", "leaky_relu"])
@pytest.mark.parametrize("shared_trunk", [False, True])
def test_numpy_actor_agrees_with_the_torch_policy(kind, activation, shared_trunk):
    policy, mb = _setup(kind, activation, shared_trunk=shared_trunk)
    actor = NumpyActor(policy, covers(policy)[0], np.random.default_rng(0))
    x = mb.obs.numpy()
    action, logp, value = actor.act(x)
    ref_logp, _, ref_value = policy.evaluate(mb.obs, torch.as_tensor(action))
    np.testing.assert_allclose(logp, ref_logp.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value, ref_value.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(actor.value(x), ref_value.detach().numpy(), rtol=1e-5, atol=1e-5)
    for p in policy.parameters():  # the arrays are views: an in-place optimizer step is seen at once
        p.data.mul_(0.5)
    _, _, halved = actor.act(x)
    np.testing.assert_allclose(halved, policy.evaluate(mb.obs, torch.as_tensor(action))[2].detach().numpy(),
                               rtol=1e-5, atol=1e-5)


def test_numpy_actor_samples_from_the_policy_distribution():
    policy, mb = _setup("Discrete", "tanh")
    actor = NumpyActor(policy, "tanh", np.random.default_rng(1))
    x = np.repeat(mb.obs[:1].numpy(), 60_000, axis=0)
    action, _, _ = actor.act(x)
    freq = np.bincount(action, minlength=3) / len(action)
    probs = torch.softmax(policy.policy_head(policy.actor_encoder(mb.obs[:1])), -1)[0].detach().numpy()
    np.testing.assert_allclose(freq, probs, atol=0.01)


def test_clip_grad_norm_matches_torch():
    from torch import nn

    from ppo_cli.algo.update import clip_grad_norm

    for scale in (0.01, 100.0):  # below and above the limit
        a = [nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(5))]
        b = [nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(5))]
        for p, q in zip(a, b, strict=True):
            p.grad = torch.randn_like(p) * scale
            q.grad = p.grad.clone()
        torch.testing.assert_close(clip_grad_norm(a, 0.5), nn.utils.clip_grad_norm_(b, 0.5))
        for p, q in zip(a, b, strict=True):
            torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fused_adam_step_matches_optimizer_step(name):
    from ppo_cli.algo.update import FusedAdamStep, make_optimizer

    runs = []
    for direct in (False, True):
        torch.manual_seed(0)
        policy = ActorCritic(OBS, SPACES["Box"], [8, 8])
        opt = make_optimizer(policy, name, 3e-3, 1e-3, 1e-5, 0.01)
        step = FusedAdamStep.build(opt) if direct else opt.step
        assert step is not None
        grads = torch.Generator().manual_seed(1)
        for i in range(5):
            for p in policy.parameters():
                p.grad = torch.randn(p.shape, generator=grads)
            if i == 3:  # a schedule changing the learning rate between steps
                opt.param_groups[0]["lr"] = 1e-4
            step()
        runs.append((list(policy.parameters()), opt.state_dict()))
    (ref_params, ref_state), (params, state) = runs
    for a, b in zip(ref_params, params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ref_state["state"], state["state"], rtol=0, atol=0)


def test_fused_adam_step_is_not_used_where_it_does_not_apply():
    from ppo_cli.algo.update import FusedAdamStep

    params = [torch.nn.Parameter(torch.zeros(3))]
    assert FusedAdamStep.build(torch.optim.Adam(params)) is None  # not fused
    assert FusedAdamStep.build(torch.optim.Adam(params, fused=True, amsgrad=True)) is None
    assert FusedAdamStep.build(torch.optim.SGD(params)) is None
    hooked = torch.optim.Adam(params, fused=True)
    hooked.register_step_post_hook(lambda *_: None)
    assert FusedAdamStep.build(hooked) is None


def test_torch_compile_compiles_the_loss_and_the_policy_step_and_says_when_it_has_no_effect(tmp_path):
    from ppo_cli.algo.rollout import TorchActor
    from ppo_cli.algo.update import minibatch_loss
    from ppo_cli.run.runner import Runner
    from tests.conftest import TINY, make_cfg

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    overrides = [*TINY, "fast_update=false", "fast_rollout=false", "network.net_arch=[16]",
                 "algo.total_timesteps=128", "eval.objective=train", "eval.final=false", "checkpoint_interval=0"]
    compiled = Runner(make_cfg(*overrides, "torch_compile=true"), tmp_path / "a")
    assert compiled.algo.updater.gradients.loss_fn is not minibatch_loss and not compiled.notes
    actor = compiled.algo.actor
    assert isinstance(actor, TorchActor) and actor._sample != compiled.algo.policy.sample_step
    result = compiled.run()
    assert result.global_step == 128
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # the loss and the step went through dynamo
    eager = Runner(make_cfg(*overrides), tmp_path / "b")
    eager.run()
    # The same draws make the same actions; the compiled kernels round differently, so log-probs are close only.
    assert torch.equal(compiled.algo.buffer.actions, eager.algo.buffer.actions)
    torch.testing.assert_close(compiled.algo.buffer.logp, eager.algo.buffer.logp, rtol=1e-4, atol=1e-5)
    for t in (compiled, eager):
        t.close()

    plain = Runner(make_cfg(*TINY, "torch_compile=true"), tmp_path / "c")
    assert not isinstance(plain.algo.updater.gradients, AutogradGradients)
    assert any("torch_compile=true has no effect" in note for note in plain.notes)
    plain.close()


def test_a_loss_that_cannot_be_compiled_says_so_in_one_line_and_runs_uncompiled(monkeypatch):
    import torch._inductor.config as inductor_config

    from ppo_cli.algo.update import compile_loss, minibatch_loss

    torch._dynamo.reset()
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-compiler-here",))
    policy, mb = _setup("Discrete", "tanh")
    s = UpdateSettings(0.1, None, 0.01, 0.5, 0.5, 1, 64, True, None)
    said: list[str] = []
    loss = compile_loss(said.append)
    for _ in range(2):  # the second call goes straight to the uncompiled loss, without a second note
        got, stats = loss(policy, mb, s)
        want, want_stats = minibatch_loss(policy, mb, s)
        assert torch.equal(got, want) and torch.equal(stats, want_stats)
    assert len(said) == 1 and said[0].startswith("note: torch_compile: torch.compile could not compile the loss (")
    assert said[0].endswith("); it runs uncompiled") and "\n" not in said[0]
    torch._dynamo.reset()
