"""Ratio direction, clipping and the signs of the loss terms, on crafted numbers."""

import math

import pytest
import torch

from ppo_cli.algo.storage import Batch
from ppo_cli.algo.update import UpdateSettings, clipped_surrogate, minibatch_loss, value_loss


def test_ratio_is_new_over_old():
    new, old = torch.tensor([math.log(0.6)]), torch.tensor([math.log(0.3)])
    _, ratio = clipped_surrogate(new, old, torch.tensor([1.0]), 0.2)
    torch.testing.assert_close(ratio, torch.tensor([2.0]))  # 0.6 / 0.3, not 0.3 / 0.6


def test_clipping_by_sign_of_advantage():
    eps = 0.2
    ratios = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    logp = torch.log(ratios)
    per_sample = [clipped_surrogate(logp[i:i + 1], torch.zeros(1), adv[i:i + 1], eps)[0].item() for i in range(5)]
    # A > 0, r above 1+eps: capped at 1.2. A > 0, r below 1-eps: not clipped (min keeps the worse 0.5).
    # A < 0, r above 1+eps: not clipped (-1.5). A < 0, r below 1-eps: capped at -0.8. Inside: r * A.
    assert per_sample == pytest.approx([1.2, 0.5, -1.5, -0.8, 2.2], abs=1e-6)


def test_clipped_gradient_is_zero_outside_trust_region():
    logp = torch.tensor([math.log(1.5)], requires_grad=True)
    surrogate, _ = clipped_surrogate(logp, torch.zeros(1), torch.tensor([1.0]), 0.2)
    surrogate.backward()
    assert logp.grad.item() == 0.0


def test_value_loss_is_mse_and_clipping_is_pessimistic():
    v, old, ret = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0]), torch.tensor([2.0, 2.0])
    assert value_loss(v, old, ret, None).item() == 1.0  # ((1-2)^2 + (3-2)^2) / 2
    # clipped predictions: 0.5 and 0.5 -> errors 2.25 and 2.25; max with unclipped (1, 1) -> 2.25
    assert value_loss(v, old, ret, 0.5).item() == 2.25


class _FixedPolicy(torch.nn.Module):
    """evaluate() returns given log-probs, entropies and values, so each loss term can be isolated."""

    def __init__(self, logp, entropy, values):
        super().__init__()
        self.logp, self.entropy, self.values = logp, entropy, values

    def evaluate(self, obs, actions):
        return self.logp, self.entropy, self.values


def _settings(**kw) -> UpdateSettings:
    base = dict(clip_range=0.2, clip_range_vf=None, ent_coef=0.0, vf_coef=0.0, max_grad_norm=0.5, K_epochs=1,
                batch_size=2, normalize_advantage=False, target_kl=None)
    return UpdateSettings(**{**base, **kw})


def test_loss_signs():
    z = torch.zeros(2)
    mb = Batch(torch.zeros(2, 1), torch.zeros(2), logp=z, values=z, advantages=torch.tensor([1.0, 1.0]),
               returns=torch.tensor([1.0, 1.0]))
    logp = torch.zeros(2, requires_grad=True)
    entropy = torch.tensor([0.7, 0.7], requires_grad=True)
    values = torch.zeros(2, requires_grad=True)
    pol = _FixedPolicy(logp, entropy, values)
    # Policy term alone: loss = -L_clip = -1; raising the log-prob of a positive-advantage action lowers it.
    loss, stats = minibatch_loss(pol, mb, _settings())
    assert loss.item() == -1.0 and stats[0].item() == -1.0
    loss.backward()
    assert (logp.grad < 0).all()
    # Entropy enters with a minus sign: more entropy, lower loss.
    loss, _ = minibatch_loss(pol, mb, _settings(ent_coef=0.5))
    assert abs(loss.item() - (-1.0 - 0.5 * 0.7)) < 1e-6
    # Value term with a plus sign: vf_coef * MSE(0, 1) = 0.5.
    loss, stats = minibatch_loss(pol, mb, _settings(vf_coef=0.5))
    assert abs(loss.item() - (-1.0 + 0.5)) < 1e-6 and stats[1].item() == 1.0


def test_approx_kl_and_clip_fraction():
    old = torch.zeros(2)
    new = torch.log(torch.tensor([1.5, 1.0]))
    mb = Batch(torch.zeros(2, 1), torch.zeros(2), logp=old, values=old, advantages=torch.ones(2), returns=old)
    _, stats = minibatch_loss(_FixedPolicy(new, torch.zeros(2), torch.zeros(2)), mb, _settings())
    # (r - 1) - log r, averaged: ((0.5 - log 1.5) + 0) / 2
    assert abs(stats[3].item() - (0.5 - math.log(1.5)) / 2) < 1e-6
    assert stats[4].item() == 0.5
