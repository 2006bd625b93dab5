"""Encoders: the network input (see ActorCritic.prepare) -> a feature vector the action and value heads read.

An encoder is an nn.Module with a `features_dim` attribute, built by a factory registered in ENCODERS under its
`network.type` name. Adding one is a class here and one line in ENCODERS; the policy and the trainer do not
change. A recurrent core (RECURRENT, `network.recurrent`) sits on top of any encoder.

The image encoders (IMAGE_ENCODERS: `cnn`, `impala`) read the network input of an image observation: uint8
[n, C, H, W] (observations.InputLayout keeps images as bytes, so the rollout buffer stores a quarter of float32's
memory) and scale it to [0, 1] themselves. They run their convolutions in channels-last memory order, which
oneDNN's CPU kernels prefer (docs/pixels.md has the figures).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ppo_cli.config import ENCODER_NAMES
from ppo_cli.errors import UserError

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}
HIDDEN_GAIN = math.sqrt(2.0)


def init_hidden(layer: nn.Linear | nn.Conv2d, scheme: str, activation: str, bias: float) -> None:
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


def _image_input(x: torch.Tensor) -> torch.Tensor:
    """Images [n, C, H, W] of pixel values 0-255 (uint8, or float32 where other inputs came with them; any memory
    order) -> float32 in [0, 1], channels-last in memory."""
    x = x.contiguous(memory_format=torch.channels_last)
    # In place on uint8's new float copy; a float input may share memory with the caller's tensor.
    return x.float().mul_(1.0 / 255.0) if x.dtype == torch.uint8 else x * (1.0 / 255.0)


def _linears_after(in_dim: int, widths: list[int], init: str | None, bias: float) -> tuple[list[nn.Module], int]:
    layers: list[nn.Module] = []
    for width in widths:
        linear = nn.Linear(in_dim, width)
        if init is not None:
            init_hidden(linear, init, "relu", bias)
        layers += [linear, nn.ReLU()]
        in_dim = width
    return layers, in_dim


class ImageEncoder(nn.Module):
    """What the image encoders share: uint8 images -> `convs` -> flatten -> `head` -> float32 features.

    An image that came with other inputs (a Dict observation; observations.py) arrives as one float32 row per
    observation, the pixels ([C, H, W] flattened) and then `extra_dim` other columns; these join the flattened
    convolution features before `head`.

    `compute_dtype` (network.precision) is the dtype the encoder computes in: None for float32, or
    torch.bfloat16 to run it under torch.autocast, which casts the convolutions' and linear layers' inputs and
    weights to bfloat16 (the parameters themselves, their gradients and the optimizer stay float32). The
    features are float32 again before the heads, so logits, log-probs, values and the losses are float32."""

    convs: nn.Module
    head: nn.Module
    compute_dtype: torch.dtype | None = None

    def __init__(self, shape: tuple[int, int, int], extra_dim: int) -> None:
        super().__init__()
        self.image_shape, self.extra_dim = shape, extra_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            if self.extra_dim:
                pixels, extra = x[:, :-self.extra_dim].reshape(x.shape[0], *self.image_shape), x[:, -self.extra_dim:]
            else:
                pixels, extra = x, None
            maps = self.convs(_image_input(pixels))
            if len(self.head) and maps.device.type == "cpu" and len(maps) >= MAPS_AS_KERNEL_MIN_ROWS:
                h = self.head[1:](linear_over_maps(self.head[0], maps, extra))  # head: [Linear, ReLU] * widths
            else:  # a GPU's matmul is its fastest kernel, and a small batch's on the CPU: the plain form
                h = self.head(maps.flatten(1) if extra is None else torch.cat([maps.flatten(1), extra], dim=1))
        return h.float()


# From this many rows up, linear_over_maps is the faster form on the CPU; below it, oneDNN's reordering of the
# weight for every call costs more than it saves (Nature CNN, one thread, forward and backward: 1.3x slower at 16
# rows, the same at 64, 12% faster at 256; the forward alone at 8 rows, a rollout step: 1.3x slower).
MAPS_AS_KERNEL_MIN_ROWS = 128


def linear_over_maps(linear: nn.Linear, maps: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """linear(cat([maps.flatten(1), extra])), computed as a convolution whose kernel is the whole map, for the CPU.

    The same sums (the weight's columns, read in flatten's C, H, W order, are the kernel), but oneDNN's
    convolution kernels run them, where a Linear goes to the BLAS (MKL): on the CPU, the Nature CNN's 3136 -> 512
    layer's forward and backward at a minibatch of 256 take about 40% less time this way, the whole minibatch step 12%
    (docs/pixels.md).
    `extra` (other inputs beside an image, [n, k]) meets the weight's last k columns in a plain matmul."""
    n, c, h, w = maps.shape
    size = c * h * w
    weight = linear.weight if extra is None else linear.weight[:, :size]
    out = nn.functional.conv2d(maps, weight.view(linear.out_features, c, h, w), linear.bias).flatten(1)
    if extra is not None:
        out = out + extra @ linear.weight[:, size:].t()
    return out


class NatureCNN(ImageEncoder):
    """The Nature DQN trunk (Mnih et al. 2015) as the PPO paper's Atari setting uses it (`network.type=cnn`):
    conv 32 8x8 stride 4, conv 64 4x4 stride 2, conv 64 3x3 stride 1, then the linear layers of `widths`
    (network=cnn: one of 512), ReLU after each; hidden layers initialized by `init` (orthogonal: gain sqrt 2).
    Images need at least MIN_SIZE pixels a side."""

    MIN_SIZE = 36

    def __init__(self, shape: tuple[int, int, int], widths: list[int], init: str = "orthogonal",
                 bias: float = 0.0, extra_dim: int = 0) -> None:
        super().__init__(shape, extra_dim)
        c, h, w = shape
        convs = [nn.Conv2d(c, 32, 8, stride=4), nn.Conv2d(32, 64, 4, stride=2), nn.Conv2d(64, 64, 3, stride=1)]
        for conv in convs:
            init_hidden(conv, init, "relu", bias)  # type: ignore[arg-type]
        self.convs = nn.Sequential(*(m for conv in convs for m in (conv, nn.ReLU())))
        side = lambda n: ((n - 8) // 4 + 1 - 4) // 2 + 1 - 2  # noqa: E731 - the three convs' output side
        layers, self.features_dim = _linears_after(64 * side(h) * side(w) + extra_dim, widths, init, bias)
        self.head = nn.Sequential(*layers)
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(torch.relu(self.conv0(torch.relu(x))))


class ConvSequence(nn.Module):
    """IMPALA's stack: conv 3x3, max-pool 3x3 stride 2, two residual blocks."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.res0, self.res1 = ResidualBlock(out_channels), ResidualBlock(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.conv(x), kernel_size=3, stride=2, padding=1)
        return self.res1(self.res0(x))


class ImpalaCNN(ImageEncoder):
    """IMPALA's residual trunk (Espeholt et al. 2018) as CleanRL's procgen PPO builds it (`network.type=impala`):
    three ConvSequences of 16, 32 and 32 channels, ReLU, then the linear layers of `widths` (network=impala: one
    of 256), ReLU after each. Initialized as CleanRL does: PyTorch's default for every layer (network.init is
    not used)."""

    def __init__(self, shape: tuple[int, int, int], widths: list[int], channels: tuple[int, ...] = (16, 32, 32),
                 extra_dim: int = 0) -> None:
        super().__init__(shape, extra_dim)
        c, h, w = shape
        stacks = []
        for out in channels:
            stacks.append(ConvSequence(c, out))
            c, h, w = out, (h + 1) // 2, (w + 1) // 2
        self.convs = nn.Sequential(*stacks, nn.ReLU())
        layers, self.features_dim = _linears_after(c * h * w + extra_dim, widths, None, 0.0)
        self.head = nn.Sequential(*layers)
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def _image_shape(kind: str, n: Any, min_size: int = 1) -> tuple[int, int, int]:
    """The [C, H, W] of the image input an image encoder is built for (settings.input_shape), or UserError."""
    shape = tuple(n.input_shape)
    if len(shape) != 3:  # observations.InputLayout.check refuses this first; kept for direct callers
        raise UserError(f"network.type={kind} needs image observations (see docs/pixels.md)")
    if min(shape[1:]) < min_size:
        raise UserError(f"network.type={kind}: images of {shape[1]}x{shape[2]} pixels are too small for the Nature "
                        f"trunk, which needs at least {min_size}x{min_size}; use network=impala (any size), "
                        f"env.image=false with network=mlp to read them as flat numbers (codes rather than "
                        f"pixels), or make the env's images larger")
    return shape  # type: ignore[return-value]


# network.type -> factory(input dimension, the network settings as plain values) -> encoder. Image encoders also
# read `input_shape` (the image's [C, H, W]) and `extra_dim` (observations.InputLayout) from the settings.
ENCODERS: dict[str, Callable[[int, Any], nn.Module]] = {
    "mlp": lambda in_dim, n: MLPEncoder(in_dim, list(n.net_arch), n.activation_fn, n.init, n.bias),
    "cnn": lambda in_dim, n: NatureCNN(_image_shape("cnn", n, NatureCNN.MIN_SIZE), list(n.net_arch), n.init,
                                       n.bias, n.extra_dim),
    "impala": lambda in_dim, n: ImpalaCNN(_image_shape("impala", n), list(n.net_arch), extra_dim=n.extra_dim),
}
assert tuple(ENCODERS) == ENCODER_NAMES, "config.ENCODER_NAMES lists the encoders a config may name"


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

    RNN: type[nn.LSTM] | type[nn.GRU]  # the torch layer; each subclass says which, and how its state is split
    STATE_PARTS = 1  # tensors of `hidden` values in the layer's state (an LSTM's h and c: 2)

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.rnn = self.RNN(in_dim, hidden, batch_first=True)
        for name, param in self.rnn.named_parameters():  # as CleanRL's ppo_atari_lstm
            if "weight" in name:
                nn.init.orthogonal_(param, 1.0)
            else:
                nn.init.constant_(param, 0.0)
        self.features_dim = hidden
        self.state_size = self.STATE_PARTS * hidden

    def _split(self, state: torch.Tensor) -> Any:
        """The state tensor [n, state_size] as the torch layer takes it."""
        return state.unsqueeze(0).contiguous()

    def _join(self, state: Any) -> torch.Tensor:
        """The torch layer's state as one tensor [n, state_size]."""
        return state[0]

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


class GRUCore(RecurrentCore):
    RNN = nn.GRU


class LSTMCore(RecurrentCore):
    """Its state tensor is h and c side by side."""

    RNN = nn.LSTM
    STATE_PARTS = 2

    def _split(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = state.unsqueeze(0)
        return s[..., :self.hidden].contiguous(), s[..., self.hidden:].contiguous()

    def _join(self, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.cat(state, dim=-1)[0]


# network.recurrent -> core(input features, hidden size)
RECURRENT: dict[str, type[RecurrentCore]] = {"lstm": LSTMCore, "gru": GRUCore}
