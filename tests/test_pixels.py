"""Pixels (docs/pixels.md): the CNN encoders, uint8 storage, image checks, the Atari pipeline and game scores,
resuming frame-stacked runs, and a tiny image task a CNN learns."""

import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from torch import nn

from ppo_cli.algo.fast.observations import NumpyInput
from ppo_cli.algo.rollout import TorchActor, collect
from ppo_cli.algo.storage import RolloutBuffer
from ppo_cli.algo.timing import Stopwatch
from ppo_cli.config import ENCODER_DEFAULTS
from ppo_cli.envs import atari
from ppo_cli.envs.make import make_vec_env, restore, snapshot
from ppo_cli.envs.spaces import describe_space
from ppo_cli.errors import UserError
from ppo_cli.policy.actor_critic import ActorCritic, build_policy, settle_network
from ppo_cli.policy.encoders import NatureCNN
from ppo_cli.policy.observations import InputLayout, as_tensors
from ppo_cli.run import checkpoint
from ppo_cli.run.evaluation import run_episodes
from ppo_cli.run.runner import Runner

from .conftest import cli, make_cfg, needs_atari


class LitCell(gym.Env):
    """Go to the lit cell: a 36x36 uint8 image (the Nature trunk's smallest) of a 3x3 grid of 12x12 cells, one of
    them lit; the action names a cell, reward 1 if it is the lit one. Each step lights a new random cell; an
    episode is `length` steps (random policy: length / 9, the optimum: length). `gray` gives a (36, 36) image,
    else (36, 36, 1), channels last; `cell` sets the cells' side in pixels. `mirror`: a Dict observation,
    {"image": the image, "mirror": MultiBinary(1)}, where a set bit makes the mirrored cell (8 - lit) the right
    one: only image and bit together tell the action."""

    metadata = {"render_modes": []}
    GRID = 3

    def __init__(self, length: int = 4, gray: bool = False, cell: int = 12, mirror: bool = False) -> None:
        side = self.GRID * cell
        self.image_space = gym.spaces.Box(0, 255, (side, side) if gray else (side, side, 1), np.uint8)
        self.observation_space = (gym.spaces.Dict({"image": self.image_space, "mirror": gym.spaces.MultiBinary(1)})
                                  if mirror else self.image_space)
        self.action_space = gym.spaces.Discrete(self.GRID * self.GRID)
        self.length, self.gray, self.CELL, self.mirror = length, gray, cell, mirror
        self.lit, self.t, self.flip = 0, 0, 0

    def _obs(self):
        img = np.zeros(self.image_space.shape, dtype=np.uint8)
        row, col = divmod(self.lit, self.GRID)
        img[row * self.CELL:(row + 1) * self.CELL, col * self.CELL:(col + 1) * self.CELL] = 255
        return {"image": img, "mirror": np.array([self.flip], dtype=np.int8)} if self.mirror else img

    def _next(self) -> None:
        self.lit = int(self.np_random.integers(self.GRID * self.GRID))
        self.flip = int(self.np_random.integers(2)) if self.mirror else 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._next()
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        reward = float(int(action) == (self.GRID * self.GRID - 1 - self.lit if self.flip else self.lit))
        self._next()
        self.t += 1
        return self._obs(), reward, self.t >= self.length, False, {}


LIT = "env.entry_point=tests.test_pixels:LitCell"
SMALL = ["env.num_envs=2", "algo.n_steps=16", "algo.batch_size=16", "algo.total_timesteps=64", "eval.final=false",
         "eval.every_steps=0", "eval.objective=train", "checkpoint_interval=0"]


def _space(shape, dtype=np.uint8):
    return describe_space(gym.spaces.Box(0, 255, shape, dtype))


DISCRETE = {"type": "Discrete", "n": 4}


# --- the CNN encoders --------------------------------------------------------------------------------------------

def test_nature_cnn_shapes_and_init():
    cfg = make_cfg("network=cnn")
    policy = build_policy(_space((4, 84, 84)), DISCRETE, cfg)
    trunk = policy.actor_encoder
    assert isinstance(trunk, NatureCNN) and policy.critic_encoder is trunk and policy.shared_trunk
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (4, 32, (8, 8), (4, 4)), (32, 64, (4, 4), (2, 2)), (64, 64, (3, 3), (1, 1))]
    linears = [m for m in trunk.modules() if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(64 * 7 * 7, 512)]
    assert sum(isinstance(m, nn.ReLU) for m in trunk.modules()) == 4
    # Orthogonal with gain g: the rows (flattened) of W / g are orthonormal (there are fewer rows than columns).
    for layer, gain in [*((m, 2 ** 0.5) for m in (*convs, *linears)), (policy.policy_head, 0.01),
                        (policy.value_head, 1.0)]:
        w = layer.weight.detach().flatten(1) / gain
        assert torch.allclose(w @ w.T, torch.eye(w.shape[0]), atol=1e-4), layer
        assert torch.all(layer.bias == 0)
    x = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    out, value = policy(x)
    assert out.shape == (5, 4) and value.shape == (5,) and trunk(x).shape == (5, 512)
    # Scaled to [0, 1] inside: the input 255 is 1.0 (the first conv sees the same as float input / 255).
    assert torch.allclose(trunk.convs[0](x.float() / 255), trunk.convs[0](trunk_input(x)), atol=1e-5)


@pytest.mark.parametrize("extra", [0, 3])
def test_the_linear_layer_over_the_maps_computes_flatten_then_linear(extra, monkeypatch):
    """encoders.linear_over_maps (the CPU's form: a convolution with the whole map as its kernel) gives the outputs
    and the gradients of flatten + nn.Linear, with and without other inputs beside the maps; a trunk on the CPU
    computes its features through it."""
    from ppo_cli.policy import encoders
    from ppo_cli.policy.encoders import linear_over_maps

    torch.manual_seed(0)
    linear = nn.Linear(64 * 7 * 7 + extra, 32)
    maps = torch.randn(6, 64, 7, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    other = torch.randn(6, extra) if extra else None
    plain = linear(maps.flatten(1) if other is None else torch.cat([maps.flatten(1), other], dim=1))
    grads = torch.autograd.grad(plain.square().sum(), [maps, linear.weight, linear.bias])
    fast = linear_over_maps(linear, maps, other)
    fast_grads = torch.autograd.grad(fast.square().sum(), [maps, linear.weight, linear.bias])
    assert fast.shape == plain.shape and torch.allclose(fast, plain, rtol=1e-5, atol=1e-4)
    for g, f in zip(grads, fast_grads, strict=True):
        assert torch.allclose(f, g, rtol=1e-4, atol=1e-4 * g.abs().max().item())
    # The column order matters: a weight read as [out, H, W, C] instead of [out, C, H, W] gives other sums.
    assert not torch.allclose(fast, linear(torch.cat([maps.permute(0, 2, 3, 1).flatten(1), *(
        [other] if extra else [])], dim=1)), atol=1e-2)
    # A trunk on the CPU takes this form for batches of MAPS_AS_KERNEL_MIN_ROWS and more (a minibatch), the plain
    # one below (a rollout step), where the convolution's weight reordering would cost more than it saves.
    trunk = NatureCNN((2, 40, 40), [32])
    x = torch.randint(0, 256, (encoders.MAPS_AS_KERNEL_MIN_ROWS, 2, 40, 40), dtype=torch.uint8)
    plain_features = torch.relu(trunk.head[0](trunk.convs(trunk_input(x)).flatten(1)))
    calls = []
    monkeypatch.setattr(encoders, "linear_over_maps", lambda *a: calls.append(a) or linear_over_maps(*a))
    assert torch.allclose(trunk(x), plain_features, rtol=1e-5, atol=1e-5) and len(calls) == 1
    assert torch.allclose(trunk(x[1:]), plain_features[1:], rtol=1e-5, atol=1e-5) and len(calls) == 1


def trunk_input(x):
    from ppo_cli.policy.encoders import _image_input
    return _image_input(x)


def test_impala_cnn_shapes_and_separate_trunks():
    cfg = make_cfg("network=impala", "network.shared_trunk=false")
    policy = build_policy(_space((64, 64, 3)), DISCRETE, cfg)
    assert policy.critic_encoder is not policy.actor_encoder
    convs = [m for m in policy.actor_encoder.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 * 5 and [c.out_channels for c in convs[::5]] == [16, 32, 32]
    assert policy.actor_encoder.head[0].in_features == 32 * 8 * 8 and policy.actor_encoder.features_dim == 256
    x = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)  # HWC, as the env gives it
    out, value = policy(policy.prepare(x))
    assert out.shape == (3, 4) and value.shape == (3,)
    names = {n for n, _ in policy.named_parameters()}
    assert any(n.startswith("critic_encoder.") for n in names)
    # Both groups train: each encoder's parameters are in exactly one optimizer group.
    actor, critic = {id(p) for p in policy.actor_parameters()}, {id(p) for p in policy.critic_parameters()}
    assert not actor & critic and len(actor | critic) == len(list(policy.parameters()))


@pytest.mark.parametrize("shape,channels_last,stored", [
    ((84, 84, 4), None, (4, 84, 84)),   # HWC: the last dim is <= 4
    ((3, 64, 48), None, (3, 64, 48)),   # CHW: the first dim is <= 4
    ((40, 40), None, (1, 40, 40)),      # rank 2, both sides >= 16: one channel
    ((8, 40, 40), False, (8, 40, 40)),  # neither: the setting says
    ((40, 40, 8), True, (8, 40, 40)),
])
def test_channel_order_and_uint8_input(shape, channels_last, stored):
    layout = InputLayout(_space(shape), channels_last=channels_last)
    assert layout.stored_shape == stored and layout.stored_dtype == torch.uint8
    obs = np.random.default_rng(0).integers(0, 256, (2, *shape), dtype=np.uint8)
    x = layout.prepare(torch.from_numpy(obs), None)
    assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == stored
    hwc = channels_last if channels_last is not None else len(shape) == 3 and shape[-1] <= 4
    expected = obs.transpose(0, 3, 1, 2) if hwc else obs[:, None] if len(shape) == 2 else obs
    assert np.array_equal(x.numpy(), expected)
    assert np.array_equal(NumpyInput(layout, None).prepare(obs, False), expected)  # the fast path's twin


def test_not_images_stay_flat():
    for space in (_space((10, 10)), _space((5, 84, 84), np.float32), _space((12,))):
        layout = InputLayout(space)
        assert layout.image is None and layout.stored_shape == (layout.dim,) and layout.stored_dtype == torch.float32


def test_bfloat16_precision_runs_the_encoder_in_bfloat16_and_the_rest_in_float32():
    """network.precision=bfloat16: the encoder computes in bfloat16 (its features differ from float32's by
    bfloat16's rounding), everything a loss reads is float32, the parameters and gradients stay float32, and
    set_precision("float32") gives float32's results exactly."""
    space = _space((4, 84, 84))
    torch.manual_seed(0)
    half = build_policy(space, DISCRETE, make_cfg("network=cnn", "network.precision=bfloat16"))
    torch.manual_seed(0)
    full = build_policy(space, DISCRETE, make_cfg("network=cnn"))
    assert half.actor_encoder.compute_dtype is torch.bfloat16 and full.actor_encoder.compute_dtype is None
    x = torch.randint(0, 256, (16, 4, 84, 84), dtype=torch.uint8)
    h16, h32 = half.actor_encoder(x), full.actor_encoder(x)
    assert h16.dtype == torch.float32 and not torch.equal(h16, h32)
    assert torch.allclose(h16, h32, rtol=0.05, atol=0.05 * h32.abs().max().item())
    actions = torch.randint(0, 4, (16,))
    logp, entropy, value = half.evaluate(x, actions)
    assert logp.dtype == entropy.dtype == value.dtype == torch.float32
    (-logp.mean() + value.pow(2).mean()).backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in half.parameters() if p.requires_grad)
    half.set_precision("float32")
    assert torch.equal(half.actor_encoder(x), h32)


def test_bfloat16_policies_export_in_float32(tmp_path):
    from ppo_cli.policy.export import export_policy

    torch.manual_seed(0)
    policy = build_policy(_space((4, 84, 84)), DISCRETE, make_cfg("network=cnn", "network.precision=bfloat16"))
    export_policy(policy, tmp_path / "m.torchscript.pt", "torchscript", stochastic=True)
    model = torch.jit.load(str(tmp_path / "m.torchscript.pt"))
    x = torch.randint(0, 256, (8, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        assert policy.actor_encoder.compute_dtype is None  # the export computes in float32 ...
        expected = policy(x)[0]
        assert torch.allclose(model(x), expected, atol=1e-5)
        policy.set_precision("bfloat16")  # ... and not in bfloat16
        assert not torch.allclose(policy(x)[0], expected, atol=1e-5)


@pytest.mark.parametrize("image_shape", [(36, 36, 1), (36, 36, 3), (3, 40, 40)])
def test_an_image_in_a_dict_goes_through_the_cnn_with_the_other_keys_beside_its_features(image_shape):
    """Dict {image, vector}: one float32 row per observation, the pixels in [C, H, W] order then the vector; the
    trunk runs its convolutions on the pixels and its linear layer reads the vector beside their features."""
    space = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, image_shape, np.uint8),
                             "vector": gym.spaces.Box(-1.0, 1.0, (2,), np.float32)})
    policy = build_policy(describe_space(space), DISCRETE, make_cfg("network=cnn"))
    layout, trunk = policy.layout, policy.actor_encoder
    pixels = math.prod(image_shape)
    assert layout.stored_shape == (pixels + 2,) and layout.stored_dtype == torch.float32 and layout.extra_dim == 2
    side = ((image_shape[1] - 8) // 4 + 1 - 4) // 2 + 1 - 2  # the Nature trunk's output side (HWC and CHW alike)
    assert trunk.head[0].in_features == 64 * side * side + 2
    space.seed(0)
    obs = [space.sample() for _ in range(3)]
    batch = {k: np.stack([o[k] for o in obs]) for k in ("image", "vector")}
    x = policy.prepare(as_tensors(batch))
    chw = batch["image"] if image_shape[0] == 3 else batch["image"].transpose(0, 3, 1, 2)
    assert torch.equal(x[:, :pixels], torch.as_tensor(chw.reshape(3, -1), dtype=torch.float32))
    assert torch.equal(x[:, pixels:], torch.as_tensor(batch["vector"]))
    assert np.array_equal(NumpyInput(layout, None).prepare(batch, False), x.numpy())  # the fast path's twin
    other_vector, other_pixels = x.clone(), x.clone()
    other_vector[:, -1] += 0.5
    other_pixels[:, 0] = 255.0 - other_pixels[:, 0]
    features = trunk(x)
    assert not torch.equal(trunk(other_vector), features) and not torch.equal(trunk(other_pixels), features)
    assert torch.equal(x[:, :pixels], torch.as_tensor(chw.reshape(3, -1), dtype=torch.float32))  # not scaled in place
    with pytest.raises(UserError, match=r"^observation key 'image' is an image \(uint8 Box .*\): use network=cnn"):
        build_policy(describe_space(space), DISCRETE, make_cfg("network=mlp"))
    assert build_policy(describe_space(space), DISCRETE, make_cfg()).layout.extra_dim == 2  # network=auto: the CNN
    # env.normalize_obs normalizes the vector beside the image, never the pixels.
    normed = build_policy(describe_space(space), DISCRETE, make_cfg("network=cnn", "env.normalize_obs=true"))
    assert normed.layout.box_dim == 2 and normed.obs_norm is not None
    normed.update_obs_stats(as_tensors(batch))
    y = normed.prepare(as_tensors(batch))
    assert torch.equal(y[:, :pixels], x[:, :pixels]) and not torch.allclose(y[:, pixels:], x[:, pixels:])


def test_rollout_buffer_stores_uint8_images(tmp_path):
    cfg = make_cfg(LIT, "network=cnn", *SMALL)
    trainer = Runner(cfg, tmp_path / "run", rich_progress=False)
    try:
        stored = trainer.algo.buffer.obs
        assert stored.dtype == torch.uint8 and tuple(stored.shape) == (16, 2, 1, 36, 36)
        floats = RolloutBuffer(16, 2, (36 * 36,), torch.float32, (), torch.int64, torch.device("cpu"))
        assert floats.obs.nbytes == 4 * trainer.algo.buffer.obs.nbytes
        trainer.run()
        seen = trainer.algo.buffer.obs.numpy()
        assert seen.max() == 255 and set(np.unique(seen)) <= {0, 255}  # the images themselves, not scaled
    finally:
        trainer.close()


def test_rollout_buffer_lays_images_out_channels_last_and_minibatches_keep_it():
    """obs_channels_last: the buffer holds [C, H, W] images in [H, W, C] memory order (the encoders'), stores each
    step's images unchanged, and the flattened batch and a shuffled minibatch of it keep that order."""
    rng = np.random.default_rng(0)
    buffer = RolloutBuffer(3, 2, (4, 10, 12), torch.uint8, (), torch.int64, torch.device("cpu"), obs_channels_last=True)
    images = [torch.from_numpy(rng.integers(0, 256, (2, 4, 10, 12), dtype=np.uint8)) for _ in range(3)]
    for x in images:
        buffer.add(x, torch.zeros(2, dtype=torch.int64), torch.zeros(2), torch.zeros(2), np.zeros(2, np.float32),
                   np.zeros(2, bool), np.zeros(2, bool))
    assert buffer.obs.shape == (3, 2, 4, 10, 12) and buffer.obs.stride()[2:] == (1, 12 * 4, 4)  # C innermost
    batch = buffer.advantages(torch.zeros(2), 0.99, 0.95)
    assert torch.equal(batch.obs, torch.cat(images)) and batch.obs.is_contiguous(memory_format=torch.channels_last)
    minibatch = batch[torch.tensor([5, 0, 3])][:2]
    assert torch.equal(minibatch.obs, torch.cat(images)[[5, 0]])
    assert minibatch.obs.is_contiguous(memory_format=torch.channels_last)


# --- bad input: one line each ------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,fragment", [
    ([LIT, "network=mlp"], "the observations are images (uint8 Box (36, 36, 1)): use network=cnn"),
    (["network=cnn"], "network.type=cnn needs image observations"),
    ([LIT, "network=cnn", "env.normalize_obs=true"], "image observations (uint8 Box (36, 36, 1)) are scaled"),
    ([LIT, "network=cnn", "+env.kwargs.cell=8"], "images of 24x24 pixels are too small for the Nature trunk, which "
                                                 "needs at least 36x36; use network=impala (any size), env.image=false "
                                                 "with network=mlp"),
    ([LIT, "network=cnn", "+env.kwargs.cell=2"], "network.type=cnn needs image observations (a uint8 Box of rank 2 or "
                                                 "3 whose two largest sides are >= 16, or smaller with env.image=true"),
    (["env.image=true"], "env.image=true: this env's observation space (Box (4,)) has no uint8 Box of rank 2 or 3 "
                         "to read as an image"),
    (["env.image=maybe"], "env.image='maybe': must be true, false or auto"),
    (["network.precision=bfloat16"], "network.precision='bfloat16': bfloat16 applies to the image encoders (cnn, "
                                     "impala); network.type=mlp computes in float32 only"),
])
def test_bad_image_input_is_one_line_exit_2(tmp_path, overrides, fragment):
    proc = cli("ppo-train", *overrides, *SMALL, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("ppo-train: error:"), proc.stderr
    assert fragment in lines[0], lines


def test_too_small_for_the_nature_trunk_and_unknown_order():
    with pytest.raises(UserError, match=r"24x24 pixels are too small for the Nature trunk, which needs at least 36x36"):
        build_policy(_space((24, 24)), DISCRETE, make_cfg("network=cnn"))
    build_policy(_space((24, 24)), DISCRETE, make_cfg("network=impala"))  # IMPALA takes any size
    with pytest.raises(UserError, match=r"cannot tell the channel order .* set network.channels_last"):
        build_policy(_space((8, 40, 40)), DISCRETE, make_cfg("network=cnn"))
    two = gym.spaces.Dict({"left": gym.spaces.Box(0, 255, (36, 36, 3), np.uint8),
                           "right": gym.spaces.Box(0, 255, (36, 36, 3), np.uint8)})
    with pytest.raises(UserError, match=r"observation keys 'left' and 'right' are both images: one image per "):
        ActorCritic(describe_space(two), DISCRETE, [64], encoder="cnn")


def test_atari_without_the_extra_is_one_line(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_ale(name, *args, **kwargs):
        if name == "ale_py":
            raise ImportError("No module named 'ale_py'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ale)
    with pytest.raises(UserError, match=r"Atari games need ale-py.*install the 'atari' extra"):
        make_vec_env(make_cfg("env=Breakout").env, seed=0, num_envs=1)


# --- whole-game scores -------------------------------------------------------------------------------------------

class _Ale:
    def __init__(self):
        self.n = 3

    def lives(self):
        return self.n


class LivesEnv(gym.Env):
    """A stand-in for an Atari game after frame preprocessing: 3 lives, one lost every 10 steps, reward 5 per
    step (unclipped), 84x84 frames; action 1 is FIRE."""

    observation_space = gym.spaces.Box(0, 255, (84, 84), np.uint8)
    action_space = gym.spaces.Discrete(4)

    def __init__(self):
        self.ale, self.t = _Ale(), 0

    def get_action_meanings(self):
        return ["NOOP", "FIRE", "RIGHT", "LEFT"]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.ale.n, self.t = 3, 0
        return np.zeros((84, 84), np.uint8), {}

    def step(self, action):
        self.t += 1
        if self.t % 10 == 0:
            self.ale.n -= 1
        return np.full((84, 84), self.t, np.uint8), 5.0, self.ale.n == 0, False, {}


def _lives_envs(n, training):
    envs = gym.vector.SyncVectorEnv([lambda: atari.game_wrappers(LivesEnv(), training)] * n,
                                    autoreset_mode=AutoresetMode.SAME_STEP)
    return atari.GameStatistics(envs)


def test_a_lost_life_continues_the_game_but_a_seeded_reset_starts_a_new_one():
    env = atari.EpisodicLife(LivesEnv())
    env.reset(seed=0)
    for _ in range(10):
        _, _, terminated, _, _ = env.step(0)
    assert terminated and env.unwrapped.ale.n == 2  # the first life lost: PPO's episode ends
    env.reset()
    assert env.unwrapped.ale.n == 2 and env.unwrapped.t == 11  # the game went on, one no-op later
    env.reset(seed=1)  # the trainer's seeded reset (its start, a resume): a new game, not a step of the old one
    assert env.unwrapped.ale.n == 3 and env.unwrapped.t == 0


def test_training_episodes_are_lives_but_returns_are_whole_unclipped_games():
    """PPO trains on lives with clipped rewards; the rollout's returns (TensorBoard, recent returns) are games."""
    envs = _lives_envs(2, training=True)
    policy = ActorCritic(describe_space(envs.single_observation_space), DISCRETE, [512], encoder="cnn",
                         shared_trunk=True)
    buffer = RolloutBuffer(40, 2, policy.layout.stored_shape, policy.layout.stored_dtype, (), torch.int64,
                           torch.device("cpu"))
    obs, _ = envs.reset(seed=0)
    done = collect(envs, TorchActor(policy, np.random.default_rng(0), torch.device("cpu"), 2), buffer, obs, None,
                   lambda: False, Stopwatch(("env", "policy", "storage")))
    assert set(buffer.rewards.unique().tolist()) == {1.0}  # clipped
    # A game is 30 env steps at 5 points each, a life lost every 10. PPO's episodes are lives: 8 steps (after
    # the reset's FIRE and action 2), then 7 and 7 (after a no-op and those two): the game ends at agent step 22.
    assert buffer.terminated[:22, 0].nonzero().flatten().tolist() == [7, 14, 21]
    assert done.returns == [150.0, 150.0] and done.lengths == [30, 30]  # one whole game per env, unclipped
    envs.close()


def test_evaluation_plays_whole_games_with_raw_rewards():
    envs = _lives_envs(2, training=False)
    rewards = []

    def act(obs, mask, starts):
        return np.zeros(2, dtype=np.int64)

    result = run_episodes(envs, act, episodes=4, seed=0)
    assert result.returns == [150.0] * 4 and result.lengths == [30] * 4
    obs, _ = envs.reset(seed=0)
    for _ in range(25):  # a game is 26 agent steps here (FIRE and action 2 at reset, a FIRE after each lost life)
        obs, reward, terminated, truncated, _ = envs.step(np.zeros(2, dtype=np.int64))
        rewards.append(reward[0])
        assert not terminated.any()  # lives are not episodes here
    assert set(rewards) == {5.0} or set(rewards) == {5.0, 10.0}  # raw (a FIRE after a lost life adds its step)
    envs.close()


# --- resume of frame-stacked runs --------------------------------------------------------------------------------

STACK = "env.wrappers=[{_target_: gymnasium.wrappers.FrameStackObservation, stack_size: 4}]"


def test_snapshot_keeps_the_frame_stack():
    cfg = make_cfg("env.id=CartPole-v1", STACK)
    envs = make_vec_env(cfg.env, seed=0, num_envs=2)
    for _ in range(5):
        envs.step(np.ones(2, dtype=np.int64))
    state, why = snapshot(envs)
    assert why is None
    expected = envs.step(np.zeros(2, dtype=np.int64))[0]
    again = make_vec_env(cfg.env, seed=7, num_envs=2)
    restore(again, state)
    assert np.array_equal(again.step(np.zeros(2, dtype=np.int64))[0], expected)
    envs.close()
    again.close()


def _train(cfg, run_dir, resume=None, stop_after=None):
    trainer = Runner(cfg, run_dir, resume=resume, rich_progress=False)
    if stop_after is not None:
        log = trainer._log

        def log_then_stop(*args):
            log(*args)
            if trainer.update_idx == stop_after:
                trainer.stops.signal = 2

        trainer._log = log_then_stop
    try:
        trainer.run()
    except Exception as exc:  # noqa: BLE001 - Interrupted carries the checkpoint
        return trainer, exc
    finally:
        trainer.close()
    return trainer, None


def test_resume_of_a_frame_stacked_image_run_is_exact(tmp_path):
    """LitCell as a (36, 36) image, 4 frames stacked (a CHW uint8 [4, 36, 36]), with the CNN: stopped after two
    updates and resumed, it ends with the parameters of a straight run."""
    args = [LIT, "+env.kwargs.gray=true", STACK, "network=cnn", "env.num_envs=2", "algo.n_steps=16",
            "algo.batch_size=16", "algo.total_timesteps=128", "eval.final=false", "eval.every_steps=0",
            "eval.objective=train", "checkpoint_interval=0"]
    straight, _ = _train(make_cfg(*args), tmp_path / "straight")
    assert straight.algo.policy.layout.stored_shape == (4, 36, 36)
    _, stop = _train(make_cfg(*args), tmp_path / "split", stop_after=2)
    data = checkpoint.load(stop.path)
    assert data["global_step"] == 64 and data["env_state"] is not None
    resumed, _ = _train(make_cfg(*args), tmp_path / "split", resume=data)
    assert not resumed.notes or all("restart from a reset" not in n for n in resumed.notes)
    for (name, a), b in zip(straight.algo.policy.state_dict().items(), resumed.algo.policy.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


# --- a real Atari game -------------------------------------------------------------------------------------------

@needs_atari
def test_atari_pipeline_trains_evaluates_and_records(tmp_path):
    """Breakout through ppo-train for 512 steps: 4 stacked 84x84 uint8 frames in the buffer, whole games as
    returns; resume takes the reset path (the emulator is not plain data) with a note; ppo-eval --video records."""
    run = tmp_path / "run"
    cfg = make_cfg("env=Breakout", "network=cnn", "algo=ppo_atari", "env.num_envs=2", "algo.total_timesteps=512",
                   "eval.every_steps=0", "eval.episodes=1", "eval.final=false", "eval.objective=train",
                   "checkpoint_interval=1")
    trainer = Runner(cfg, run, rich_progress=False)
    try:
        stored = trainer.algo.buffer.obs
        assert stored.dtype == torch.uint8 and tuple(stored.shape) == (128, 2, 4, 84, 84)
        assert cfg.algo.batch_size == 256 and cfg.algo.K_epochs == 4 and cfg.algo.lr_actor == 2.5e-4
        result = trainer.run()
        assert result.global_step == 512
        assert set(trainer.algo.buffer.rewards.unique().tolist()) <= {-1.0, 0.0, 1.0}
        assert trainer.recent_returns  # random Breakout games last 120-300 steps: each env finished one
        assert snapshot(trainer.envs)[1] == "the env holds state that cannot be saved: AtariEnv.ale (ALEInterface)"
    finally:
        trainer.close()
    proc = cli("ppo-eval", str(run / "checkpoints" / "checkpoint.pt"), "--episodes", "1", "--video",
               str(tmp_path / "video"), "--no-random-baseline", "--json", cwd=tmp_path, check=True)
    scored = json.loads(proc.stdout)
    assert scored["episodes"] == 1 and scored["mean_length"] >= 100  # a whole game: five lives
    assert [p.name for p in (tmp_path / "video").glob("*.mp4")] == ["eval-episode-1.mp4"]


# --- a tiny image task the CNN learns ----------------------------------------------------------------------------

@pytest.mark.slow  # about a minute on 2 cores; the layout test above covers the plumbing in CI
def test_the_cnn_learns_a_dict_of_image_and_bit(tmp_path):
    """LitCell with `mirror`: the right cell is the lit one, or its mirror image when the observation's bit says so.
    Random scores ~0.44 of 4 per episode; a policy that reads only the image scores at most 2 (it must guess the
    bit), one that reads only the bit 4/9: above 3 it reads both."""
    run = tmp_path / "run"
    cli("ppo-train", LIT, "+env.kwargs.mirror=true", "network=cnn", "env.num_envs=8", "algo.n_steps=32",
        "algo.batch_size=64", "algo.K_epochs=4", "algo.lr_actor=1e-3", "algo.lr_critic=1e-3", "algo.clip_range=0.2",
        "algo.total_timesteps=32768", "eval.every_steps=2048", "eval.episodes=20", "eval.stop_at_return=3.5",
        f"hydra.run.dir={run}", cwd=tmp_path, check=True)
    result = json.loads((run / "result.json").read_text())
    assert result["final_eval"]["mean_return"] > 3.0, result


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_the_cnn_learns_to_go_to_the_lit_cell(tmp_path, precision):
    """LitCell (36x36, 9 cells): random ~0.44 of 4 per episode; the Nature CNN gets all 4 within 16k steps (it
    needs about 4k, some seconds), in float32 and with the encoder in bfloat16."""
    run = tmp_path / "run"
    cli("ppo-train", LIT, "network=cnn", f"network.precision={precision}", "env.num_envs=8", "algo.n_steps=32",
        "algo.batch_size=64", "algo.K_epochs=4", "algo.lr_actor=1e-3", "algo.lr_critic=1e-3", "algo.clip_range=0.2",
        "algo.total_timesteps=16384", "eval.every_steps=2048", "eval.episodes=20", "eval.stop_at_return=4.0",
        f"hydra.run.dir={run}", cwd=tmp_path, check=True)
    result = json.loads((run / "result.json").read_text())
    assert result["final_eval"]["mean_return"] == 4.0, result
    proc = cli("ppo-eval", str(run / "checkpoints" / "best.pt"), "--episodes", "20", "--json", "--trust-env-code",
               cwd=tmp_path, check=True)
    scored = json.loads(proc.stdout)
    assert scored["mean_return"] == 4.0 and scored["random_mean_return"] < 1.5, scored


# --- network=auto and env.image: the encoder from the observations, and what an image is (issue 30, 13-14) ------

@pytest.mark.parametrize("shape,image,encoder,why", [
    ((84, 84, 4), "auto", "cnn", "84x84 images"),
    ((4, 84, 84), "auto", "cnn", "84x84 images"),
    ((36, 36), "auto", "cnn", "36x36 images"),
    ((24, 24), "auto", "impala", "24x24 images, below the cnn's 36x36"),
    ((7, 7, 3), "auto", "mlp", "no image in the observations"),  # MiniGrid's grid of codes: read flat
    ((7, 7, 3), "true", "impala", "7x7 images, below the cnn's 36x36"),
    ((84, 84, 3), "false", "mlp", "no image in the observations"),
])
def test_network_auto_picks_the_encoder_and_its_defaults_from_the_observations(shape, image, encoder, why):
    cfg = make_cfg(f"env.image={image}")
    assert settle_network(cfg, _space(shape), DISCRETE) == why
    net_arch, shared = ENCODER_DEFAULTS[encoder]
    assert cfg.network.type == encoder and list(cfg.network.net_arch) == net_arch and cfg.network.shared_trunk is shared
    policy = build_policy(_space(shape), DISCRETE, cfg)
    assert (policy.layout.image is None) == (encoder == "mlp")
    assert policy.layout.dim == math.prod(shape) and policy.layout.stored_dtype == (
        torch.float32 if encoder == "mlp" else torch.uint8)
    assert settle_network(cfg, _space(shape), DISCRETE) == ""  # decided once: the stored config says it


def test_network_auto_keeps_what_the_config_sets_and_a_named_encoder_is_not_second_guessed():
    cfg = make_cfg("network.net_arch=[32]", "network.shared_trunk=false")
    settle_network(cfg, _space((84, 84, 4)), DISCRETE)
    assert cfg.network.type == "cnn" and list(cfg.network.net_arch) == [32] and cfg.network.shared_trunk is False
    cfg = make_cfg("network=mlp")
    assert settle_network(cfg, _space((84, 84, 4)), DISCRETE) == "" and cfg.network.type == "mlp"
    with pytest.raises(UserError, match=r"use network=cnn \(or network=impala, or network=auto\), not network.type"
                                        r"=mlp, .* env.image=false reads them so on purpose"):
        build_policy(_space((84, 84, 4)), DISCRETE, cfg)
    # A Dict with an image beside a vector: the CNN, with the vector beside its features.
    space = describe_space(gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (40, 40, 3), np.uint8),
                                            "vector": gym.spaces.Box(-1.0, 1.0, (2,), np.float32)}))
    cfg = make_cfg()
    assert settle_network(cfg, space, DISCRETE) == "40x40 images" and cfg.network.type == "cnn"
    # Small uint8 Boxes are described as such (so env.image=true can read them as images), read flat by default.
    assert _space((7, 7, 3))["dtype"] == "uint8"


def test_network_auto_is_decided_as_the_run_starts_shown_and_stored_for_eval(tmp_path):
    proc = cli("ppo-train", LIT, *SMALL, "checkpoint_interval=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "network:    cnn [512], one trunk for actor and critic (network=auto: 36x36 images)" in proc.stdout
    path = tmp_path / "run" / "checkpoints" / "checkpoint.pt"
    stored = checkpoint.load(path)["config_yaml"]
    assert "type: cnn" in stored and "- 512" in stored and "shared_trunk: true" in stored
    proc = cli("ppo-eval", str(path), "--episodes", "2", "--trust-env-code", cwd=tmp_path)
    assert proc.returncode == 0 and "return:" in proc.stdout, proc.stderr


@pytest.mark.slow  # that MiniGrid's codes are read flat by the MLP is pinned by the network=auto cases above
def test_minigrid_doorkey_learns_through_img_obs_wrapper_with_the_mlp(tmp_path):
    """MiniGrid's 7x7x3 grid of codes, through ImgObsWrapper: env.image=auto reads it flat, network=auto picks the
    MLP, and PPO solves DoorKey-5x5 (a random policy scores 0; solved is about 0.96)."""
    pytest.importorskip("minigrid")
    proc = cli("ppo-train", "env.id=minigrid:MiniGrid-DoorKey-5x5-v0",
               "env.wrappers=[{_target_:minigrid.wrappers.ImgObsWrapper}]", "env.num_envs=16", "algo.n_steps=128",
               "algo.batch_size=256", "algo.K_epochs=4", "algo.gae_lambda=0.95", "algo.total_timesteps=120000",
               "eval.every_steps=0", "eval.episodes=20", "checkpoint_interval=0", f"hydra.run.dir={tmp_path / 'run'}",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "network:    mlp [64, 64], separate actor and critic (network=auto: no image in the observations)" in (
        proc.stdout)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["final_eval"]["mean_return"] > 0.9, result["final_eval"]
    assert "--trust-env-code" not in proc.stdout  # MiniGrid's ids and ImgObsWrapper are on the allowlist


@pytest.mark.slow
def test_minigrid_doorkey_learns_from_the_dict_observation_minus_its_mission(tmp_path):
    pytest.importorskip("minigrid")
    proc = cli("ppo-train", "env.id=minigrid:MiniGrid-DoorKey-5x5-v0", "env.obs_keys=[image,direction]",
               "env.num_envs=16", "algo.n_steps=128", "algo.batch_size=256", "algo.K_epochs=4", "algo.gae_lambda=0.95",
               "algo.total_timesteps=150000", "eval.every_steps=0", "eval.episodes=20", "checkpoint_interval=0",
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["final_eval"]["mean_return"] > 0.9, result["final_eval"]


@pytest.mark.slow  # older files in general: test_architecture.py's format 1 checkpoints
def test_checkpoints_from_before_env_image_evaluate_and_resume(tmp_path):
    """Files written before every uint8 Box was described as uint8 (a flat one had no dtype) and before env.image
    (a small rank-3 image read by an image encoder) still evaluate and resume."""
    import yaml

    for name, extra, legacy in (
            ("flat", ["+env.kwargs.cell=2", "+env.kwargs.gray=true"], lambda d: d["observation_space"].pop("dtype")),
            ("small", ["+env.kwargs.cell=2", "env.image=true", "network=impala"], None)):
        run = tmp_path / name
        proc = cli("ppo-train", LIT, *SMALL, *extra, "checkpoint_interval=1", f"hydra.run.dir={run}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        path = run / "checkpoints" / "checkpoint.pt"
        data = checkpoint.load(path)
        assert data["observation_space"]["dtype"] == "uint8"
        if legacy:
            legacy(data)
        config = yaml.safe_load(data["config_yaml"])
        del config["env"]["image"]
        data["config_yaml"] = yaml.safe_dump(config)
        checkpoint.save(data, path)
        proc = cli("ppo-eval", str(path), "--episodes", "2", "--trust-env-code", cwd=tmp_path)
        assert proc.returncode == 0 and "return:" in proc.stdout, proc.stderr
        proc = cli("ppo-train", f"resume={path}", "algo.total_timesteps=128", "trust_env_code=true", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr


@needs_atari
def test_breakout_with_the_atari_preset_needs_no_network_named():
    """`ppo-train env=Breakout algo=ppo_atari` (issue 30, item 13): network=auto reads the 84x84 frames with the
    Nature CNN, one trunk of [512], as network=cnn did."""
    cfg = make_cfg("env=Breakout", "algo=ppo_atari")
    assert settle_network(cfg) == "84x84 images"
    named = make_cfg("env=Breakout", "algo=ppo_atari", "network=cnn")
    settle_network(named)
    assert cfg.network == named.network
