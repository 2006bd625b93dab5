"""Playing a model written by ppo-export (export.py): its metadata read and checked, the model loaded with
onnxruntime or torch.jit, and an actor for evaluation.run_episodes that plays it as the checkpoint policy plays."""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppo_cli.envs.spaces import MASK_KEY
from ppo_cli.errors import UserError, extra_hint, first_line
from ppo_cli.policy.export import FORMAT, FORMAT_VERSION, FORMATS, METADATA_KEY, sidecar_path
from ppo_cli.policy.heads import DiagGaussian, build_head


def detect(path: str | os.PathLike[str]) -> str | None:
    """The export format of `path` ("onnx" / "torchscript"), or None for anything else (a checkpoint): by the
    sidecar JSON where there is one, else by the file name."""
    side = sidecar_path(path)
    if side.is_file():
        try:
            fmt = json.loads(side.read_text()).get("model_format")
        except (OSError, ValueError, AttributeError):
            fmt = None
        if fmt in FORMATS:
            return fmt
    name = str(path).lower()
    if name.endswith(".onnx"):
        return "onnx"
    if name.endswith((".torchscript.pt", ".torchscript", ".ts")):
        return "torchscript"
    return None


class ExportedModel:
    """A model written by ppo-export, loaded with onnxruntime or torch.jit; `run(feeds)` maps input names to
    arrays and returns the outputs by name."""

    def __init__(self, path: str | os.PathLike[str], fmt: str, run_code: bool = False) -> None:
        """`run_code`: the user's word that `path` may run code. A TorchScript file is a program (torch.jit.load has
        no safe mode), so without it only its metadata is read, from the archive, and `load()` refuses."""
        self.path, self.format, self.run_code = Path(path), fmt, run_code
        p = self.path
        if not p.is_file():
            raise UserError(f"model {str(p)!r} does not exist" if not p.exists() else f"model {str(p)!r} is not a file")
        # The copy inside the model describes exactly these bytes; the sidecar is the fallback (a model whose
        # metadata was stripped by another tool).
        text = self._load_onnx() if fmt == "onnx" else self._torchscript_metadata()
        side = sidecar_path(p)
        if text is None and side.is_file():
            try:
                text = side.read_text()
            except OSError as exc:
                raise UserError(f"cannot read {side} ({exc.strerror})") from None
        if text is None:
            raise UserError(f"model {str(p)!r} was not written by ppo-export (no ppo-cli metadata inside and no "
                            f"{side.name} beside it)")
        try:
            self.metadata = json.loads(text)
        except ValueError as exc:
            raise UserError(f"the ppo-cli metadata of {str(p)!r} is not JSON ({str(exc)[:160]})") from None
        if not isinstance(self.metadata, dict) or self.metadata.get("format") != FORMAT:
            raise UserError(f"model {str(p)!r}: its metadata has no '{FORMAT}' format tag")
        version = self.metadata.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UserError(f"model {str(p)!r} has export format version {version!r}, newer than this ppo-cli "
                            f"reads ({FORMAT_VERSION}); upgrade ppo-cli")
        self.inputs = self.metadata["inputs"]
        self.output_names = [o["name"] for o in self.metadata["outputs"]]

    def _load_onnx(self) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(f"running an ONNX model needs onnxruntime: {extra_hint('export')}") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: onnxruntime's warnings are about graph optimizations
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for bad files
            raise UserError(f"model {str(self.path)!r} is not a valid ONNX model ({first_line(exc)[:160]})") from None
        return self._session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)

    def _torchscript_metadata(self) -> str | None:
        """The metadata torch.jit.save stored as an extra file (`<archive>/extra/<key>`), read as a zip member:
        nothing of the program is loaded."""
        try:
            with zipfile.ZipFile(self.path) as archive:
                names = [n for n in archive.namelist() if n.split("/", 1)[-1] == f"extra/{METADATA_KEY}"]
                return archive.read(names[0]).decode() if names else None
        except (zipfile.BadZipFile, OSError, UnicodeDecodeError, RuntimeError) as exc:
            raise UserError(f"model {str(self.path)!r} is not a TorchScript model ({str(exc)[:160]})") from None

    def load(self) -> None:
        """Load the runtime: an onnxruntime session is made on reading; a TorchScript program only here, on the
        user's word."""
        if self.format == "onnx" or hasattr(self, "_module"):
            return
        if not self.run_code:
            raise UserError(f"model {str(self.path)!r} is TorchScript, a program that loading runs (torch.jit.load has "
                            f"no safe mode); refused, nothing was loaded. If you trust it, add --trust-env-code (an "
                            f"ONNX export holds no code: ppo-export --format onnx)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._module = torch.jit.load(str(self.path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - a foreign or corrupt archive fails in many ways
            raise UserError(f"model {str(self.path)!r} is not a TorchScript model ({first_line(exc)[:160]})") from None
        self._module.eval()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.format == "onnx":
            return dict(zip(self.output_names, self._session.run(self.output_names, feeds), strict=True))
        self.load()
        with torch.inference_mode():
            result = self._module(*[torch.from_numpy(np.ascontiguousarray(feeds[i["name"]])) for i in self.inputs])
        result = result if isinstance(result, tuple) else (result,)
        return {name: t.detach().numpy() for name, t in zip(self.output_names, result, strict=True)}

    def feeds(self, obs: Any, mask: np.ndarray | None = None, state: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The inputs for a batch of observations as a vector env returns them (cast to the declared dtypes)."""
        feeds = {}
        for port in self.inputs:
            name, dtype = port["name"], port["dtype"]
            if name == "obs":
                value = obs
            elif name.startswith("obs."):
                key = name[4:]
                value = obs[int(key)] if isinstance(obs, (tuple, list)) else obs[key]
            elif name == "action_mask":
                value = mask
            else:  # state_in
                value = state
            feeds[name] = np.asarray(value, dtype=dtype)
        return feeds

    def actor(self, num_envs: int, deterministic: bool = True,
              seed: int = 0) -> Callable[[Any, np.ndarray | None, np.ndarray], np.ndarray]:
        """`act(obs, mask, starts) -> env actions` for evaluation.run_episodes, playing as evaluation.evaluate plays
        the checkpoint policy: a recurrent state zeroed at episode starts; a stochastic export drawn from the same
        numpy generator, with the same noise, as the policy's head draws."""
        meta = self.metadata
        names = {p["name"] for p in self.inputs}
        if not deterministic and not meta["stochastic"]:
            raise UserError(f"model {str(self.path)!r} returns the deterministic action; --stochastic needs a model "
                            f"exported with --stochastic")
        recurrent = meta.get("recurrent")
        state = np.zeros((num_envs, recurrent["state_size"]), np.float32) if recurrent else None
        head = build_head(meta["action_space"]) if meta["stochastic"] else None
        rng = np.random.default_rng(seed)

        def act(obs: Any, mask: np.ndarray | None, starts: np.ndarray) -> np.ndarray:
            nonlocal state
            if mask is not None and "action_mask" not in names and f"obs.{MASK_KEY}" not in names:
                raise UserError(f"the env gives action masks, but model {str(self.path)!r} takes none: export it "
                                f"with --action-mask")
            if state is not None:
                state[starts] = 0.0
            out = self.run(self.feeds(obs, mask, state))
            if state is not None:
                state = out["state_out"]
            if head is None:
                return out["action"]
            m = None if mask is None else torch.as_tensor(mask)
            if isinstance(head, DiagGaussian):
                mean, log_std = torch.from_numpy(out["mean"]), torch.from_numpy(out["log_std"])
                action = mean if deterministic else mean + torch.from_numpy(head.noise(rng, len(mean))) * log_std.exp()
            else:
                logits = torch.from_numpy(out["logits"])
                action = (head.mode(logits, m) if deterministic
                          else head.sample(logits, torch.from_numpy(head.noise(rng, len(logits))), m))
            return head.env_action(action.numpy())

        return act
