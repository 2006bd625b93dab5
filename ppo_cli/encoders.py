"""Encoders: the network input (see ActorCritic.prepare) -> a feature vector the action and value heads read.

An encoder is an nn.Module with a `features_dim` attribute, built by a factory registered in ENCODERS under its
`network.type` name. Adding one (a CNN, a recurrent core) is a class here and one line in ENCODERS; the policy
and the trainer do not change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

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
