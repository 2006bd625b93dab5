"""The actor-critic: observation -> network input -> encoder -> action head and value head.

    obs --prepare--> x --actor_encoder--> h --policy_head--> out --dist (heads.py)--> action, log-prob, entropy
                       --critic_encoder--> h' --value_head--> V

`prepare` turns raw observations into the network input (observations.InputLayout: flattened, one-hot,
normalized when env.normalize_obs is on; a Dict or Tuple part by part); the rollout stores x, so the update
sees exactly the input the old policy saw. The encoders come from encoders.ENCODERS (`network.type`), the
distribution from heads.HEADS (by action space). With a shared trunk the critic reads the actor's encoder.
`mask` (masks.py) restricts a categorical head to the actions the env allows.

`act` is what the rollout and evaluation call (sample or pick, log-prob, value; no graph), `evaluate` what the
update calls (log-prob of stored actions, entropy, value; with graph).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from ppo_cli.config import ENCODER_DEFAULTS, choice
from ppo_cli.devices import resolve_precision
from ppo_cli.envs.agents import AGENT_ID, GROUP, STATE
from ppo_cli.envs.make import env_spaces
from ppo_cli.envs.spaces import describe_space, space_items
from ppo_cli.errors import UserError
from ppo_cli.policy.encoders import RECURRENT, ImageEncoder, NatureCNN, RecurrentCore, build_encoder
from ppo_cli.policy.groups import GroupedActorCritic, check_shared
from ppo_cli.policy.heads import HEADS, build_head
from ppo_cli.policy.normalize import ObsNormalizer
from ppo_cli.policy.observations import InputLayout

POLICY_HEAD_GAIN = 0.01  # near-uniform initial policy: every action gets explored
VALUE_HEAD_GAIN = 1.0


def _init_head(layer: nn.Linear, gain: float, bias: float) -> None:
    # Heads are orthogonal whatever the hidden scheme: their gain, not the scheme, is what matters.
    nn.init.orthogonal_(layer.weight, gain=gain)
    nn.init.constant_(layer.bias, bias)


class ActorCritic(nn.Module):
    """Actor and state-value critic (see the module doc)."""

    def __init__(self, obs_space: dict[str, Any], action_space: dict[str, Any], net_arch: list[int],
                 activation_fn: str = "tanh", init: str = "orthogonal", bias: float = 0.0,
                 shared_trunk: bool = False, log_std_init: float = 0.0, normalize_obs: bool = False,
                 clip_obs: float = 10.0, encoder: str = "mlp", recurrent: str | None = None, rnn_hidden: int = 128,
                 rnn_shared: bool = False, channels_last: bool | None = None, precision: str = "float32",
                 image: bool | str = "auto", skip_keys: tuple[str, ...] = (),
                 critic_keys: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.obs_space, self.action_space = obs_space, action_space
        self.dist = build_head(action_space, log_std_init)
        # Images stay uint8 [C, H, W] for an image encoder (observations.py); `check` refuses a mismatch.
        # `skip_keys`: Dict keys neither network reads; `critic_keys`: keys only the critic reads (algo=mappo's
        # global state: envs/agents.py), so the actor encoder reads the other columns alone (`actor_columns`).
        self.layout = InputLayout(obs_space, masked=self.dist.maskable, channels_last=channels_last, image=image,
                                  skip=tuple(skip_keys))
        self.layout.check(encoder, normalize_obs)
        in_dim = self.layout.dim
        self.skip_keys, self.critic_keys = tuple(skip_keys), tuple(critic_keys)
        cols = self.layout.columns(self.critic_keys) if critic_keys else None
        self.actor_columns: torch.Tensor | None = None if cols is None else torch.tensor(cols)
        if critic_keys and (shared_trunk or self.layout.image is not None):
            raise UserError("algo=mappo's critic reads the global state beside the agent's observation, which needs "
                            "separate MLP encoders (network.shared_trunk=false); image observations are not built for "
                            "it: use algo=ippo")
        # The critic reads the actor's features: a shared trunk, or a recurrent core it shares with the actor.
        self.shared_trunk = shared_trunk or (recurrent is not None and rnn_shared)
        image = self.layout.image
        settings = SimpleNamespace(net_arch=list(net_arch), activation_fn=activation_fn, init=init, bias=bias,
                                   input_shape=self.layout.stored_shape if image is None else image.shape,
                                   extra_dim=self.layout.extra_dim)
        # Only the Box parts are normalized: one-hot and binary inputs are already on a fixed scale.
        self.obs_norm = (ObsNormalizer(self.layout.box_dim, clip_obs) if normalize_obs and self.layout.box_dim
                         else None)
        # The head is registered first: parameters() then lists its own (the log-std) first, as format 1 did,
        # and the fast path's flat gradient buffer, and so the summation order of the gradient norm, follow
        # parameters().
        # Construction order is initialization order (each layer draws from torch's global generator): actor
        # encoder, critic encoder, then the two output layers.
        actor_settings = settings if cols is None else SimpleNamespace(**{**vars(settings), "extra_dim": 0})
        self.actor_encoder = build_encoder(encoder, in_dim if cols is None else len(cols), actor_settings)
        self.critic_encoder = (self.actor_encoder if self.shared_trunk
                               else build_encoder(encoder, in_dim, settings))
        features = self.actor_encoder.features_dim
        self.recurrent = recurrent
        self.actor_core: RecurrentCore | None = None
        self.critic_core: RecurrentCore | None = None
        if recurrent is not None:
            self.actor_core = RECURRENT[recurrent](features, rnn_hidden)
            self.critic_core = (self.actor_core if self.shared_trunk
                                else RECURRENT[recurrent](self.critic_encoder.features_dim, rnn_hidden))
            features = rnn_hidden
        self.policy_head = nn.Linear(features, self.dist.n_outputs)
        self.value_head = nn.Linear(features, 1)
        _init_head(self.policy_head, POLICY_HEAD_GAIN, bias)
        _init_head(self.value_head, VALUE_HEAD_GAIN, bias)
        self.action_shape, self.action_dtype = self.dist.action_shape, self.dist.action_dtype
        self.set_precision(precision)

    def set_precision(self, precision: str) -> None:
        """The dtype the image encoders compute in (`network.precision`; encoders.ImageEncoder): "float32" or
        "bfloat16". Other encoders always compute in float32 (config.validate refuses bfloat16 for them)."""
        dtype = None if precision == "float32" else getattr(torch, precision)
        for module in self.modules():
            if isinstance(module, ImageEncoder):
                module.compute_dtype = dtype

    def critic_parameters(self) -> list[nn.Parameter]:
        """Trained at lr_critic: the value head, and a critic encoder and recurrent core of its own."""
        own = [] if self.shared_trunk else [*self.critic_encoder.parameters()]
        if self.critic_core is not None and self.critic_core is not self.actor_core:
            own += list(self.critic_core.parameters())
        return [*own, *self.value_head.parameters()]

    def actor_parameters(self) -> list[nn.Parameter]:
        """Trained at lr_actor: every other parameter (a shared trunk too: the policy is what PPO's clip protects,
        and so is any layer a subclass adds)."""
        # This order is the optimizer state's order in every checkpoint.
        own = [*self.actor_encoder.parameters(), *self.policy_head.parameters(), *self.dist.own_parameters()]
        listed = {id(p) for p in (*own, *self.critic_parameters())}
        return own + [p for p in self.parameters() if id(p) not in listed]

    def prepare(self, obs: Any) -> torch.Tensor:
        """Network input for a batch of raw observations (a tensor, or a dict / tuple of them), normalized with
        the frozen statistics."""
        return self.layout.prepare(obs, self.obs_norm)

    def update_obs_stats(self, obs: Any) -> None:
        """Fold a batch of raw observations into the normalization statistics (training rollouts only)."""
        if self.obs_norm is not None:
            self.obs_norm.update(self.layout.box_input(obs))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(action head outputs, values) for a batch of network inputs (policies without a recurrent core)."""
        h = self.actor_encoder(self.actor_input(x))
        hv = h if self.shared_trunk else self.critic_encoder(x)
        return self.policy_head(h), self.value_head(hv).squeeze(-1)

    def actor_input(self, x: torch.Tensor) -> torch.Tensor:
        """The columns of the network input the actor reads (all, but where the critic reads more)."""
        if self.actor_columns is None:
            return x
        if self.actor_columns.device != x.device:
            self.actor_columns = self.actor_columns.to(x.device)
        return x.index_select(-1, self.actor_columns)

    # --- recurrent state: one tensor [n, state_size] per batch of envs (encoders.RecurrentCore) --------------
    @property
    def state_size(self) -> int:
        if self.actor_core is None:
            return 0
        separate = self.critic_core is not self.actor_core
        return self.actor_core.state_size * (2 if separate else 1)

    def initial_state(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The state of n fresh episodes (zeros), or None for a policy without a recurrent core."""
        return None if self.actor_core is None else torch.zeros(n, self.state_size, device=device)

    def step(self, x: torch.Tensor,
             state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(action head outputs, values, next state) for one time step; without a core, forward and no state."""
        if self.actor_core is None:
            out, value = self(x)
            return out, value, None
        if state is None:
            raise ValueError("a recurrent policy needs its state: see initial_state")
        h = self.actor_encoder(self.actor_input(x))
        hv = h if self.shared_trunk else self.critic_encoder(x)
        size = self.actor_core.state_size
        h, new_state = self.actor_core.step(h, state[:, :size])
        if self.critic_core is self.actor_core:
            hv = h
        else:
            hv, critic_state = self.critic_core.step(hv, state[:, size:])  # type: ignore[union-attr]
            new_state = torch.cat([new_state, critic_state], dim=1)
        return self.policy_head(h), self.value_head(hv).squeeze(-1), new_state

    def _sequences(self, x: torch.Tensor, starts: torch.Tensor, states: torch.Tensor,
                   seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """forward over whole sequences: x [b * seq_len, in] sequence by sequence, with the episode starts and, in
        every row, its sequence's initial state (the first row of each sequence is read)."""
        n = x.shape[0]
        b = n // seq_len
        starts, state0 = starts.reshape(b, seq_len), states[::seq_len]
        h = self.actor_encoder(self.actor_input(x))
        hv = h if self.shared_trunk else self.critic_encoder(x)
        size = self.actor_core.state_size  # type: ignore[union-attr]
        h = self.actor_core.sequences(h.reshape(b, seq_len, -1), starts, state0[:, :size]).reshape(n, -1)  # type: ignore[union-attr]
        if self.critic_core is self.actor_core:
            hv = h
        else:
            hv = self.critic_core.sequences(hv.reshape(b, seq_len, -1), starts,  # type: ignore[union-attr]
                                            state0[:, size:]).reshape(n, -1)
        return self.policy_head(h), self.value_head(hv).squeeze(-1)

    # --- what the rollout, the update and evaluation call --------------------------------------------------
    @torch.no_grad()
    def act_step(self, x: torch.Tensor, state: torch.Tensor | None, rng: np.random.Generator | None = None,
                 deterministic: bool = False, mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(actions, log-probs, values, next state) for a batch of network inputs: sampled with `rng`, or the
        mode; `state` is None without a recurrent core."""
        if deterministic or rng is None:
            out, value, new_state = self.step(x, state)
            action = self.dist.mode(out, mask)
            logp, _ = self.dist.log_prob_entropy(out, action, mask)
            return action, logp, value, new_state
        noise = torch.from_numpy(self.dist.noise(rng, x.shape[0])).to(x.device)
        return self.sample_step(x, state, noise, mask)

    @torch.no_grad()
    def sample_step(self, x: torch.Tensor, state: torch.Tensor | None, noise: torch.Tensor,
                    mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """act_step's sampling with its randomness drawn already (`dist.noise`, on x's device): tensors in, tensors
        out, which is what the rollout compiles (torch_compile) and stages on a GPU (rollout.TorchActor)."""
        out, value, new_state = self.step(x, state)
        action = self.dist.sample(out, noise, mask)
        logp, _ = self.dist.log_prob_entropy(out, action, mask)
        return action, logp, value, new_state

    def act(self, x: torch.Tensor, rng: np.random.Generator | None = None, deterministic: bool = False,
            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """act_step for a policy without a recurrent core: (actions, log-probs, values)."""
        return self.act_step(x, None, rng, deterministic, mask)[:3]

    @torch.no_grad()
    def value(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """V of a batch of network inputs (through forward, so a subclass's own layers count), from `state` for
        a recurrent policy."""
        return self.step(x, state)[1]

    def evaluate(self, x: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor | None = None,
                 starts: torch.Tensor | None = None, states: torch.Tensor | None = None,
                 seq_len: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-prob of `actions`, entropy, value) for a batch of network inputs, with autograd. A recurrent
        policy reads whole sequences of `seq_len` steps, their episode starts and initial states (Batch)."""
        out, value = self(x) if self.actor_core is None else self._sequences(x, starts, states, seq_len)
        logp, entropy = self.dist.log_prob_entropy(out, actions, mask)
        return logp, entropy, value

    def env_action(self, action: torch.Tensor | np.ndarray) -> np.ndarray:
        """Stored actions (the torch rollout's tensors or the numpy rollout's arrays) as the env takes them."""
        return self.dist.env_action(action if isinstance(action, np.ndarray) else action.cpu().numpy())


def settle_network(cfg: Any, obs_space: dict[str, Any] | None = None,
                   action_space: dict[str, Any] | None = None) -> str:
    """Decide in `cfg.network` what the config leaves open. For network.type=auto, from the described spaces
    (where they are not given, one env is built to read them): cnn for images the Nature trunk can read (>=
    NatureCNN.MIN_SIZE a side), impala for smaller images, mlp where there is no image (env.image says what one
    is). Then net_arch and shared_trunk where null, the encoder's own (config.ENCODER_DEFAULTS). The run stores
    the decided values, so a checkpoint rebuilds the same policy. Returns why the encoder was picked ('' where the
    config named it)."""
    n, why = cfg.network, ""
    if choice(n.type) == "auto":
        if obs_space is None or action_space is None:
            spaces = env_spaces(cfg.env)
            obs_space, action_space = describe_space(spaces[0]), describe_space(spaces[1], bounds=True)
        masked = HEADS[action_space["type"]].maskable
        image = InputLayout(obs_space, masked, n.channels_last, cfg.env.get("image", "auto")).image
        if image is None:
            n.type, why = "mlp", "no image in the observations"
        else:
            h, w = image.shape[1:] if image.order else sorted(image.space_shape)[-2:]
            n.type = "cnn" if min(h, w) >= NatureCNN.MIN_SIZE else "impala"
            why = f"{h}x{w} images" + ("" if n.type == "cnn" else f", below the cnn's {NatureCNN.MIN_SIZE}x"
                                                                  f"{NatureCNN.MIN_SIZE}")
    net_arch, shared = ENCODER_DEFAULTS[choice(n.type)]
    if n.net_arch is None:
        n.net_arch = net_arch
    if n.shared_trunk is None:
        n.shared_trunk = shared
    return why


def build_policy(obs_space: dict[str, Any], action_space: dict[str, Any], cfg: Any,
                 device: torch.device | str = "cpu") -> ActorCritic:
    """The policy a run config describes (network group, plus env.normalize_obs / env.clip_obs), computing in the
    precision network.precision gives on `device` (where it will run; the policy is built on the CPU)."""
    settle_network(cfg, obs_space, action_space)
    n, e = cfg.network, cfg.env
    precision = resolve_precision(choice(n.precision), choice(n.type), torch.device(device))
    skip, critic_keys = agent_keys(obs_space, cfg)

    def build(more_skip: tuple[str, ...] = ()) -> ActorCritic:
        return ActorCritic(obs_space, action_space, list(n.net_arch), choice(n.activation_fn), choice(n.init),
                           float(n.bias), bool(n.shared_trunk), float(n.log_std_init), bool(e.normalize_obs),
                           float(e.clip_obs), choice(n.type), None if n.recurrent is None else choice(n.recurrent),
                           int(n.rnn_hidden), bool(n.rnn_shared), n.channels_last, precision, e.get("image", "auto"),
                           (*skip, *more_skip), critic_keys)

    if n.get("share", True):
        check_shared(obs_space)
        return build()
    return GroupedActorCritic(obs_space, build)  # type: ignore[return-value]


def agent_keys(obs_space: dict[str, Any], cfg: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(keys no network reads, keys only the critic reads) of a PettingZoo env's rows (envs/agents.py): IPPO reads
    the agent's own observation, MAPPO's critic the global state too, and network.agent_id adds the agent id. The
    group index only routes rows to their group's policy (policy/groups.py)."""
    keys = {k for k, _ in space_items(obs_space)} if obs_space["type"] == "Dict" else set()
    algo = choice(cfg.algo.get("multi_agent"))
    if algo not in ("ippo", "mappo") or AGENT_ID not in keys:
        return (), ()
    skip = ([] if cfg.network.get("agent_id") else [AGENT_ID]) + ([GROUP] if GROUP in keys else [])
    if algo == "mappo":
        if STATE not in keys:
            raise UserError("algo=mappo's critic reads the env's global state, and this env has no flat one (its "
                            "state() or its agents' observations are images): use algo=ippo")
        return tuple(skip), (STATE,)
    return (*skip, *([STATE] if STATE in keys else [])), ()


# Checkpoints of format version 1 named the encoders "trunks" and kept log_std on the policy itself.
V1_RENAMES = (("actor_trunk.", "actor_encoder."), ("critic_trunk.", "critic_encoder."), ("log_std", "dist.log_std"))


def migrate_v1_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for old, new in V1_RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out
