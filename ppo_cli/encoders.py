"""Encoders: the network input (see ActorCritic.prepare) -> a feature vector the action and value heads read.

An encoder is an nn.Module with a `features_dim` attribute, built by a factory registered in ENCODERS under its
`network.type` name. Adding one (a CNN, say) is a class here and one line in ENCODERS; the policy and the
trainer do not change. A recurrent core (RECURRENT, `network.recurrent`) sits on top of any encoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}
HIDDEN_GAIN = math.sqrt(2.0)


def init_hidden(layer: nn.Linear, scheme: str, activation: str, bias: float) -> None:
    if scheme == "orthogonal":
        nn.init.orthogonal_(layer.weight, gain=HIDDEN_GAIN)
    elif scheme == "xavier":
        nn.init.xavier_uniform_(layer.weight, gain=nn.init.calculate_gain(activation))
    elif scheme == "kaiming":
        nn.init.kaiming_uniform_(layer.weight, a=0.01 if activation == "leaky_relu" else 0.0,
                                 nonlinearity=activation)
    else:
        raise ValueError(f"unknown init scheme {scheme!r}")
    nn.init.constant_(layer.bias, bias)


class MLPEncoder(nn.Sequential):
    """Linear layers of the given widths, each followed by the activation (`network.type=mlp`)."""

    def __init__(self, in_dim: int, widths: list[int], activation: str = "tanh", init: str = "orthogonal",
                 bias: float = 0.0) -> None:
        layers: list[nn.Module] = []
        for width in widths:
            linear = nn.Linear(in_dim, width)
            init_hidden(linear, init, activation, bias)
            layers += [linear, ACTIVATIONS[activation]()]
            in_dim = width
        super().__init__(*layers)
        self.features_dim = in_dim
        self.activation = activation


# network.type -> factory(input dimension, the network settings as plain values) -> encoder
ENCODERS: dict[str, Callable[[int, Any], nn.Module]] = {
    "mlp": lambda in_dim, n: MLPEncoder(in_dim, list(n.net_arch), n.activation_fn, n.init, n.bias),
}


def build_encoder(kind: str, in_dim: int, settings: Any) -> nn.Module:
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder {kind!r} (known: {', '.join(ENCODERS)})")
    return ENCODERS[kind](in_dim, settings)


class RecurrentCore(nn.Module):
    """An LSTM or GRU between the encoder and the heads (`network.recurrent`), one layer.

    Its state is one tensor per env, [n, state_size]: h (and c for an LSTM) side by side, so the rollout,
    the buffer and checkpoints handle it as a plain tensor. `step` advances it by one time step; `sequences`
    replays whole sequences with the state zeroed wherever an episode starts inside them: each sequence is cut
    at its episode starts into segments, and all segments go through one fused call (no Python loop over time),
    the first from the sequence's stored state, the others from zeros.
    """

    def __init__(self, kind: str, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.kind, self.hidden = kind, hidden
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(in_dim, hidden, batch_first=True)
        for name, param in self.rnn.named_parameters():  # as CleanRL's ppo_atari_lstm
            if "weight" in name:
                nn.init.orthogonal_(param, 1.0)
            else:
                nn.init.constant_(param, 0.0)
        self.features_dim = hidden
        self.state_size = 2 * hidden if kind == "lstm" else hidden

    def _split(self, state: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        s = state.unsqueeze(0).contiguous()
        return (s[..., :self.hidden].contiguous(), s[..., self.hidden:].contiguous()) if self.kind == "lstm" else s

    def _join(self, state: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.cat(state, dim=-1)[0] if self.kind == "lstm" else state[0]

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output [n, hidden], next state) for one time step of n envs."""
        out, new = self.rnn(x.unsqueeze(1), self._split(state))
        return out[:, 0], self._join(new)

    def sequences(self, x: torch.Tensor, starts: torch.Tensor, state0: torch.Tensor) -> torch.Tensor:
        """Outputs [b, t, hidden] of b sequences x [b, t, in], starting from state0 [b, state_size], with the state
        zeroed before every step where `starts` [b, t] is true."""
        b, t = starts.shape
        starts_np = starts.detach().cpu().numpy()
        if not starts_np[:, 1:].any():  # no episode starts inside: one call over the sequences as they are
            keep = torch.as_tensor(~starts_np[:, 0], device=x.device)[:, None].to(state0.dtype)
            return self.rnn(x, self._split(state0 * keep))[0]
        flags = starts_np.copy()
        flags[:, 0] = True  # every sequence is a segment start; its state is state0 unless an episode starts there
        seq_idx, time_idx = np.nonzero(flags)
        first = seq_idx * t + time_idx
        lengths = np.diff(np.append(first, b * t))
        # Every segment left-aligned in a padded [segments, longest, in] batch. The padding after a segment's
        # end is computed and never read: an output depends only on the steps before it, so no packing is needed.
        longest = int(lengths.max())
        offsets = np.arange(longest)
        valid = offsets[None, :] < lengths[:, None]
        gather = torch.as_tensor(np.where(valid, first[:, None] + offsets[None, :], 0), device=x.device)
        keep = torch.as_tensor(~starts_np[seq_idx, time_idx], device=x.device)[:, None].to(state0.dtype)
        init = state0[torch.as_tensor(seq_idx, device=x.device)] * keep
        out = self.rnn(x.reshape(b * t, -1)[gather], self._split(init))[0]
        valid_t = torch.as_tensor(valid, device=x.device)
        result = out.new_empty(b * t, self.hidden)
        result[gather[valid_t]] = out[valid_t]
        return result.reshape(b, t, self.hidden)


RECURRENT: dict[str, Callable[[int, int], RecurrentCore]] = {
    "lstm": lambda in_dim, hidden: RecurrentCore("lstm", in_dim, hidden),
    "gru": lambda in_dim, hidden: RecurrentCore("gru", in_dim, hidden),
}
