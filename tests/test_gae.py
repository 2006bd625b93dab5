"""GAE against hand-computed numbers, with a termination and a truncation in one rollout."""

import torch

from ppo_cli.algo.storage import RolloutBuffer, compute_gae

GAMMA, LAM = 0.9, 0.8  # gamma * lambda = 0.72


def _buffer() -> RolloutBuffer:
    """Two envs, four steps. Env 0 terminates at t=1; env 1 is truncated at t=1 with V(final obs) = 2.0."""
    buf = RolloutBuffer(4, 2, (1,), torch.float32, (), torch.long, torch.device("cpu"))
    values = [[0.5, 0.1], [0.6, 0.2], [0.7, 0.3], [0.8, 0.4]]
    rewards = [[1, 0], [1, 1], [1, 0], [1, 2]]
    terminated = [[0, 0], [1, 0], [0, 0], [0, 0]]
    ended = [[0, 0], [1, 1], [0, 0], [0, 0]]
    for t in range(4):
        buf.add(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), torch.zeros(2), torch.tensor(values[t]),
                torch.tensor(rewards[t], dtype=torch.float32), torch.tensor(terminated[t], dtype=torch.float32),
                torch.tensor(ended[t], dtype=torch.float32))
        if t == 1:
            buf.set_final_values(torch.tensor([1]), torch.tensor([2.0]))
    return buf


def test_gae_matches_hand_computation_with_termination_and_truncation():
    batch = _buffer().advantages(torch.tensor([1.0, 0.5]), GAMMA, LAM)
    adv = batch.advantages.view(4, 2)
    # env 0: d3 = 1 + .9*1.0 - .8 = 1.1; d2 = 1 + .9*.8 - .7 = 1.02; d1 = 1 - .6 = .4 (terminated: no
    # bootstrap, no carry); d0 = 1 + .9*.6 - .5 = 1.04.
    expected0 = [1.04 + 0.72 * 0.4, 0.4, 1.02 + 0.72 * 1.1, 1.1]
    # env 1: d3 = 2 + .9*.5 - .4 = 2.05; d2 = .9*.4 - .3 = .06; d1 = 1 + .9*2.0 - .2 = 2.6 (truncated:
    # bootstrap from V(final obs) = 2.0, not from V(reset obs) = 0.3; no carry); d0 = .9*.2 - .1 = .08.
    expected1 = [0.08 + 0.72 * 2.6, 2.6, 0.06 + 0.72 * 2.05, 2.05]
    torch.testing.assert_close(adv[:, 0], torch.tensor(expected0))
    torch.testing.assert_close(adv[:, 1], torch.tensor(expected1))
    values = torch.tensor([[0.5, 0.1], [0.6, 0.2], [0.7, 0.3], [0.8, 0.4]])
    torch.testing.assert_close(batch.returns.view(4, 2), adv + values)


def test_lambda_zero_is_one_step_td_and_lambda_one_is_monte_carlo():
    r = torch.tensor([[1.0], [2.0], [3.0]])
    v = torch.tensor([[0.5], [0.25], [0.125]])
    zeros = torch.zeros(3, 1)
    nxt = torch.tensor([[0.25], [0.125], [4.0]])
    td, _ = compute_gae(r, v, nxt, zeros, zeros, 0.5, 0.0)
    torch.testing.assert_close(td[:, 0], torch.tensor([1 + 0.125 - 0.5, 2 + 0.0625 - 0.25, 3 + 2.0 - 0.125]))
    mc, ret = compute_gae(r, v, nxt, zeros, zeros, 0.5, 1.0)
    # lambda = 1: R_0 = 1 + .5*2 + .25*3 + .125*4 = 3.25, the discounted return with the bootstrap at the end.
    torch.testing.assert_close(ret[0, 0], torch.tensor(3.25))
    torch.testing.assert_close(mc[:, 0], torch.tensor([3.25 - 0.5, 2 + 1.5 + 1.0 - 0.25, 3 + 2.0 - 0.125]))
