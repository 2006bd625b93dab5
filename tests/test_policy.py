"""Initialisation gains, parameter groups and the distribution maths of the actor-critic."""

import math

import numpy as np
import pytest
import torch

from ppo_cli.algo.update import make_optimizer
from ppo_cli.policy.actor_critic import ActorCritic

OBS = {"type": "Box", "shape": [4]}
ACT = {"type": "Discrete", "n": 3}


def _gain_of_orthogonal(w: torch.Tensor) -> float:
    """For an orthogonal init with gain g, W W^T = g^2 I when rows <= cols (else W^T W)."""
    m = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    g2 = m.diagonal().mean().item()
    torch.testing.assert_close(m, torch.eye(m.shape[0]) * g2, atol=1e-4, rtol=1e-4)
    return math.sqrt(g2)


def test_orthogonal_gains_and_bias():
    torch.manual_seed(0)
    pol = ActorCritic(OBS, ACT, [64, 64], "tanh", "orthogonal", bias=0.0)
    for layer in (pol.actor_encoder[0], pol.actor_encoder[2], pol.critic_encoder[0], pol.critic_encoder[2]):
        assert _gain_of_orthogonal(layer.weight.detach()) == pytest.approx(math.sqrt(2), rel=1e-4)
        assert (layer.bias == 0).all()
    assert _gain_of_orthogonal(pol.policy_head.weight.detach()) == pytest.approx(0.01, rel=1e-4)
    assert _gain_of_orthogonal(pol.value_head.weight.detach()) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("scheme,activation", [("xavier", "tanh"), ("kaiming", "relu"), ("kaiming", "leaky_relu")])
def test_xavier_and_kaiming_variances(scheme, activation):
    torch.manual_seed(0)
    pol = ActorCritic(OBS, ACT, [512, 512], activation, scheme, bias=0.1)
    w = pol.actor_encoder[2].weight.detach()  # 512 x 512
    if scheme == "xavier":  # Var = gain^2 * 2 / (fan_in + fan_out), gain(tanh) = 5/3
        expected = (5 / 3) ** 2 * 2 / 1024
    else:  # Var = gain^2 / fan_in, gain(relu) = sqrt(2), gain(leaky_relu, 0.01) = sqrt(2 / (1 + 1e-4))
        expected = (2.0 if activation == "relu" else 2 / (1 + 0.01**2)) / 512
    assert w.var().item() == pytest.approx(expected, rel=0.05)
    assert (pol.actor_encoder[0].bias == 0.1).all()


def test_parameter_groups_cover_every_parameter_once():
    for shared in (False, True):
        pol = ActorCritic(OBS, ACT, [8], shared_trunk=shared)
        opt = make_optimizer(pol, "adamw", 1e-4, 1e-3, 1e-5, 0.01)
        ids = [id(p) for g in opt.param_groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in pol.parameters())
        assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-3]
        assert isinstance(opt, torch.optim.AdamW)


def test_act_and_evaluate_agree_with_torch_distributions():
    torch.manual_seed(0)
    pol = ActorCritic(OBS, ACT, [16])
    obs = torch.randn(5, 4)
    actions, logp, value = pol.act(obs, np.random.default_rng(0))
    logp2, entropy, value2 = pol.evaluate(obs, actions)
    dist = torch.distributions.Categorical(logits=pol.policy_head(pol.actor_encoder(obs)))
    torch.testing.assert_close(logp, dist.log_prob(actions))
    torch.testing.assert_close(logp2, logp)
    torch.testing.assert_close(entropy, dist.entropy())
    torch.testing.assert_close(value, value2)
    det, _, _ = pol.act(obs, deterministic=True)
    torch.testing.assert_close(det, dist.probs.argmax(-1))


def test_discrete_observations_are_one_hot():
    pol = ActorCritic({"type": "Discrete", "n": 5}, ACT, [8])
    x = pol.prepare(torch.tensor([0, 3]))
    torch.testing.assert_close(x, torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 1.0, 0]]))
