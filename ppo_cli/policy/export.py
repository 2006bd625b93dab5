"""Deployment: a trained policy as one self-contained graph, ONNX or TorchScript, and running such a graph.

    raw obs --one-hot / flatten / normalize--> x --encoders, heads--> out --mode--> action --start / clip / reshape-->
    what the env takes

`DeployedPolicy` wraps a loaded `ActorCritic` in a module that does all of that on tensors only, so that tracing
it records one graph that needs nothing of ppo-cli (nor numpy) to run: the observation exactly as the env returns
it goes in, the action exactly as the env takes it comes out. It reuses the policy's own `prepare`, `step` and
head `mode`, and writes the head's numpy `env_action` in torch ops; that is what makes the exported outputs equal
to the checkpoint policy's (tests/test_export.py checks each head, with and without normalization).

Interface (`DeployedPolicy.inputs` / `.outputs`, every dimension 0 the batch, of any size):

- inputs: `obs` (or `obs.<key>` per Dict key / `obs.<i>` per Tuple index, an `action_mask` key included): Box
  float32 (images uint8, as the env gives them), Discrete int64 [batch], MultiDiscrete int64, MultiBinary int8;
  `action_mask` (bool [batch, n], only with `action_mask=True`: for envs that give masks in `info` or through
  `action_masks()`); `state_in` float32 [batch, state_size] for a recurrent policy (zeros at an episode start).
- outputs: `action` (the env's dtype and shape: argmax for categorical heads plus the space's `start`, bits as
  int8, a Gaussian's mean clipped to the Box's bounds); or, `stochastic`, `logits` (masked logits of the
  categorical heads, the Bernoulli logits) or `mean` and `log_std`; then `value` (V(s)) with `with_value`;
  then `state_out` for a recurrent policy.

Files are written atomically, the model and beside it `<model>.json` (`metadata`: spaces, inputs and outputs,
versions, the run's env config); the same JSON is inside the model (ONNX metadata_props / a TorchScript extra
file), so a model that lost its sidecar still describes itself. `ExportedModel` loads either format back and
plays it through onnxruntime or torch.jit (ppo-eval).

Why the TorchScript-based ONNX exporter (`dynamo=False`): it needs only `onnx`, takes a fraction of a second (the
torch.export-based one needs onnxscript and several seconds per model), and exists in every torch this project
allows (>=2.4,<2.14); torch deprecates it, so moving to `dynamo=True` is the path once the pin passes its removal.
"""

from __future__ import annotations

import errno
import inspect
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppo_cli import __version__
from ppo_cli.envs.spaces import MASK_KEY, assemble, space_items
from ppo_cli.errors import UserError, extra_hint
from ppo_cli.policy.actor_critic import ActorCritic
from ppo_cli.policy.formats import FORMATS
from ppo_cli.policy.heads import DiagGaussian

FORMAT = "ppo-cli-export"
FORMAT_VERSION = 1
ONNX_OPSET = 17  # read by onnxruntime >= 1.13 and written by every torch in the pin
METADATA_KEY = "ppo_cli"  # the ONNX metadata_props key / the TorchScript extra file holding the metadata
BATCH = "batch"  # the name of the dynamic dimension

# numpy dtype name of each space's raw values, as gymnasium's spaces make them (a Box's is in its description).
_RAW_DTYPES = {"Discrete": "int64", "MultiDiscrete": "int64", "MultiBinary": "int8"}
_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                 "int64": torch.int64, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}


def sidecar_path(model: str | os.PathLike[str]) -> Path:
    """Where a model's JSON description goes: beside it, `<model file>.json`."""
    return Path(f"{model}.json")


def _port(name: str, dtype: str, shape: list[Any]) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": [BATCH, *shape]}


def _value_port(name: str, space: dict[str, Any], box_dtype: str) -> dict[str, Any]:
    """The port for raw values of `space` (a Discrete's are scalars); a Box's dtype is `box_dtype`."""
    dtype = box_dtype if space["type"] == "Box" else _RAW_DTYPES[space["type"]]
    return _port(name, dtype, list(space.get("shape", [])))


def _obs_port(name: str, space: dict[str, Any]) -> dict[str, Any]:
    # The policy reads any Box as float32; images stay bytes (observations.py).
    return _value_port(name, space, "uint8" if space.get("dtype") == "uint8" else "float32")


def _action_port(space: dict[str, Any]) -> dict[str, Any]:
    return _value_port("action", space, str(space.get("dtype", "float32")))


class DeployedPolicy(nn.Module):
    """Raw observation(s) in, env action (or distribution parameters) out; see the module doc for the interface.

    Only the deterministic policy is a function of the observation; `stochastic` returns what sampling needs
    instead, and the caller draws."""

    def __init__(self, policy: ActorCritic, stochastic: bool = False, with_value: bool = False,
                 action_mask: bool = False) -> None:
        super().__init__()
        self.policy = policy.eval()
        # ONNX runtimes and TorchScript on most CPUs have no fast bfloat16 convolutions: a model trained with
        # network.precision=bfloat16 is exported computing in float32 (its parameters are float32 anyway).
        policy.set_precision("float32")
        self.stochastic, self.with_value = stochastic, with_value
        obs_space, act_space = policy.obs_space, policy.action_space
        self.act_space = act_space
        head = policy.dist
        self.gaussian = isinstance(head, DiagGaussian)
        if self.gaussian and stochastic and hasattr(policy, "members"):
            raise UserError("--stochastic: the export of a policy per agent group (network.share=false) with "
                            "continuous actions gives the action alone (each group has its own log-std); leave out "
                            "--stochastic")
        # The observation's parts, in the order the inputs take them: a Dict's keys, a Tuple's indices, or the whole.
        # Decentralized execution (docs/multi-agent.md): the Dict keys no network reads are left out, and so is
        # algo=mappo's global state, which only the critic reads, unless the value is an output too.
        self.unread = {*policy.skip_keys, *([] if with_value else policy.critic_keys)}
        self.obs_items = [(k, sub) for k, sub in space_items(obs_space) if k not in self.unread]
        self.inputs = [_obs_port("obs" if key is None else f"obs.{key}", sub) for key, sub in self.obs_items]
        # A Dict's `action_mask` key is the mask of a maskable head (masks.py), read as the observation gives it.
        self.mask_in_obs = head.maskable and obs_space["type"] == "Dict" and MASK_KEY in obs_space["spaces"]
        self.mask_input = bool(action_mask) and not self.mask_in_obs
        if action_mask and not head.maskable:
            raise UserError(f"--action-mask: masks apply to Discrete and MultiDiscrete actions, not "
                            f"{act_space['type']}")
        if self.mask_input:
            self.inputs.append(_port("action_mask", "bool", [head.n_outputs]))
        self.recurrent = policy.actor_core is not None
        if self.recurrent:
            self.inputs.append(_port("state_in", "float32", [policy.state_size]))

        if not stochastic:
            self.outputs = [_action_port(act_space)]
        elif self.gaussian:
            self.outputs = [_port("mean", "float32", [head.n_outputs]), _port("log_std", "float32", [head.n_outputs])]
        else:
            self.outputs = [_port("logits", "float32", [head.n_outputs])]
        if with_value:
            self.outputs.append(_port("value", "float32", []))
        if self.recurrent:
            self.outputs.append(_port("state_out", "float32", [policy.state_size]))

    @property
    def input_names(self) -> list[str]:
        return [p["name"] for p in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [p["name"] for p in self.outputs]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        n_obs = len(self.obs_items)
        if self.unread:  # a Dict's: the keys left out that the critic still reads are zeros (its value is unused)
            obs = {k: v for (k, _), v in zip(self.obs_items, inputs[:n_obs], strict=True)}
            for key, sub in space_items(self.policy.obs_space):
                if key in self.policy.critic_keys and key not in obs:
                    obs[key] = inputs[0].new_zeros((inputs[0].shape[0], *sub["shape"]), dtype=torch.float32)
        else:
            obs = assemble(self.policy.obs_space, list(inputs[:n_obs]))
        rest = list(inputs[n_obs:])
        mask = None
        if self.mask_in_obs:
            raw = obs[MASK_KEY]
            mask = raw.reshape(raw.shape[0], -1) != 0  # masks.py reads 0/1 as booleans
        elif self.mask_input:
            mask = rest.pop(0)
        x = self.policy.prepare(obs)
        state = rest.pop(0) if self.recurrent else None
        out, value, new_state = self.policy.step(x, state)
        result: list[torch.Tensor]
        if not self.stochastic:
            result = [self.policy.dist.env_action_torch(self.policy.dist.mode(out, mask))]
        elif self.gaussian:
            result = [out, self.policy.dist.log_std.detach().expand_as(out)]
        else:
            # Forbidden actions' logits at the dtype's minimum, as heads.MultiCategorical masks them: softmax 0.
            result = [out if mask is None else torch.where(mask, out, torch.finfo(out.dtype).min)]
        if self.with_value:
            result.append(value)
        if new_state is not None:
            result.append(new_state)
        return result[0] if len(result) == 1 else tuple(result)

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        """Valid inputs of the declared dtypes and shapes (what tracing runs on): the lowest value of each
        discrete part (one-hot needs it in range), zeros elsewhere, every action allowed."""
        subs = [sub for _, sub in self.obs_items]
        out = []
        for port, sub in zip(self.inputs, subs + [None] * (len(self.inputs) - len(subs)), strict=True):
            shape = [batch, *port["shape"][1:]]
            if port["name"] == "action_mask":
                out.append(torch.ones(shape, dtype=torch.bool))
                continue
            t = torch.zeros(shape, dtype=_TORCH_DTYPES[port["dtype"]])
            if sub is not None and "start" in sub:  # a Discrete's or a MultiDiscrete's (per component)
                t = t + torch.as_tensor(sub["start"], dtype=torch.int64).reshape(sub.get("shape", []))
            if sub is not None and self.mask_in_obs and port["name"] == f"obs.{MASK_KEY}":
                t = torch.ones(shape, dtype=t.dtype)
            out.append(t)
        return tuple(out)


# --- writing -----------------------------------------------------------------------------------------------
def metadata(module: DeployedPolicy, fmt: str, model_file: str, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `<model>.json` holds (and the model itself): enough for a deployment to check what it loads."""
    policy = module.policy
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "ppo_cli_version": __version__,
        "model_format": fmt, "model_file": model_file, "torch_version": torch.__version__,
        "onnx_opset": ONNX_OPSET if fmt == "onnx" else None,
        "observation_space": policy.obs_space, "action_space": policy.action_space,
        "inputs": module.inputs, "outputs": module.outputs,
        "stochastic": module.stochastic, "with_value": module.with_value,
        "obs_normalization": any(m.obs_norm is not None for m in getattr(policy, "members", [policy])),
        "recurrent": ({"kind": policy.recurrent, "state_size": policy.state_size} if module.recurrent else None),
    }
    return {**meta, **(info or {})}


def to_onnx(module: DeployedPolicy, meta: dict[str, Any]) -> bytes:
    """The module as ONNX bytes (dynamic batch), `meta` inside as metadata_props[METADATA_KEY]."""
    try:
        import onnx
    except ImportError:
        raise UserError(f"--format onnx needs the onnx package: {extra_hint('export')}") from None
    buf = io.BytesIO()
    names = module.input_names + module.output_names
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():  # torch deprecates both tracers (module doc); the user can do nothing about it
        warnings.simplefilter("ignore")
        torch.onnx.export(module, module.example_inputs(), buf, input_names=module.input_names,
                          output_names=module.output_names, dynamic_axes={n: {0: BATCH} for n in names},
                          opset_version=ONNX_OPSET, do_constant_folding=True, **legacy)
    model = onnx.load_from_string(buf.getvalue())
    model.producer_name, model.producer_version = "ppo-cli", __version__
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def to_torchscript(module: DeployedPolicy, meta: dict[str, Any]) -> bytes:
    """The module traced to TorchScript (any batch size), `meta` inside as the extra file METADATA_KEY."""
    buf = io.BytesIO()
    with warnings.catch_warnings():  # as in to_onnx
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, module.example_inputs(), check_trace=False)
        torch.jit.save(traced, buf, _extra_files={METADATA_KEY: json.dumps(meta)})
    return buf.getvalue()


def write_atomic(files: list[tuple[Path, bytes]]) -> None:
    """Write each file whole to a temporary file in its folder, then rename them all into place: a crash or a
    failed write never leaves a half-written file under a final name. The renames come last, model first."""
    temps: list[tuple[str, Path]] = []
    current, renamed = files[0][0], 0
    try:
        for current, data in files:
            _check_folder(current)
            current.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{current.name}.", suffix=".tmp", dir=current.parent)
            temps.append((tmp, current))
            umask = os.umask(0)
            os.umask(umask)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp's 0600 would hide the model from its users
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, current in temps:
            os.replace(tmp, current)
            renamed += 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename and str(exc.filename) != str(current) else ""
        done = ("nothing was written" if not renamed
                else f"{', '.join(str(p) for _, p in temps[:renamed])} written, the rest not")
        raise UserError(f"cannot write {current} ({exc.strerror or type(exc).__name__}{where}); {done}") from None
    finally:
        for tmp, _ in temps[renamed:]:
            Path(tmp).unlink(missing_ok=True)


def _check_folder(path: Path) -> None:
    """The errors mkdir and mkstemp would give less clearly: a folder where the file goes, a file in the way of
    a folder."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
            return


def export_policy(policy: ActorCritic, out: str | os.PathLike[str], fmt: str, stochastic: bool = False,
                  with_value: bool = False, action_mask: bool = False,
                  info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export `policy` to `out` in `fmt` ("onnx" / "torchscript") with its sidecar JSON; returns the metadata.
    `info`: more metadata (the run's env config, steps trained, the source checkpoint)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: unknown format (choose {' or '.join(FORMATS)})")
    out = Path(out)
    module = DeployedPolicy(policy, stochastic, with_value, action_mask)
    meta = metadata(module, fmt, out.name, info)
    with torch.no_grad():
        data = to_onnx(module, meta) if fmt == "onnx" else to_torchscript(module, meta)
    write_atomic([(out, data), (sidecar_path(out), (json.dumps(meta, indent=2) + "\n").encode())])
    return meta
