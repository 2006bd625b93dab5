"""Checkpoints: versioned, written atomically, read with torch.load(weights_only=True).

A checkpoint is a dict of tensors and plain Python values only, so loading it cannot run code. Besides
`format` ("ppo-cli-checkpoint"), `format_version` (FORMAT_VERSION, bumped when a key changes meaning) and
`ppo_cli_version`, it holds the training state, whose keys STATE_KEYS lists once (best.pt adds `eval`, the
evaluation that made it the best).
"""

from __future__ import annotations

import copy
import errno
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ppo_cli import __version__
from ppo_cli.envs.recipe import show as recipe_show
from ppo_cli.envs.spaces import same_space
from ppo_cli.errors import UserError
from ppo_cli.policy.actor_critic import migrate_v1_state  # the policy owns its parameter names

FORMAT = "ppo-cli-checkpoint"
# 2: the policy's encoders are `actor_encoder` / `critic_encoder` and the Gaussian's log-std `dist.log_std`
# (version 1: `actor_trunk` / `critic_trunk` / `log_std`); version 1 files are migrated on load.
FORMAT_VERSION = 2

# The training state a checkpoint holds: key -> what it is. Runner.state() writes exactly these.
STATE_KEYS: dict[str, str] = {
    "config_yaml": "the resolved run config, as YAML text",
    "observation_space": "plain description of the observation space, to rebuild the policy without the env",
    "action_space": "plain description of the action space (with a Box's bounds)",
    "policy": "the ActorCritic state_dict (observation-normalization statistics included)",
    "optimizer": "the optimizer state_dict",
    "global_step": "environment steps taken",
    "update": "updates done",
    "rng": "torch generator state (ByteTensor) of the minibatch shuffles",
    "np_rng": "numpy bit-generator state of the action sampling",
    "env_state": "the envs' saved state, or None where they cannot be saved",
    "last_obs": "the observation the next step acts on (a dict or tuple of tensors for Dict / Tuple spaces)",
    "last_mask": "the action mask of last_obs, or None where the env gives no masks",
    "recurrent_state": "a recurrent policy's state of every env and whether it was just zeroed ({state, starts}), "
                       "or None",
    "world_size": "processes of the run (torchrun); rng, np_rng, env_state, last_obs, last_mask, recurrent_state "
                  "and reward_scaler are rank 0's",
    "ranks": "the other ranks' rng, np_rng, env_state, last_obs, last_mask, recurrent_state and reward_scaler, "
             "in rank order, or None for one process",
    "recent_returns": "returns of the last training episodes (eval.train_window), over all ranks",
    "wall_time": "seconds trained so far",
    "best_eval": "summary of the best periodic evaluation so far, with its global_step",
    "doctor": "the training doctor's warnings so far and the baselines its checks compare with (run/doctor.py)",
    "reward_scaler": "env.normalize_reward's running statistics, or None",
}
REQUIRED_KEYS = ("config_yaml", "observation_space", "action_space", "policy", "global_step")


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (full disk, unwritable or vanished folder): one line naming the file
    and the reason. The file it would have replaced is untouched."""


def _write_failure(path: Path, exc: BaseException) -> CheckpointWriteError:
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
    else:  # torch's writer reports a failed write as RuntimeError ("[enforce fail at inline_container.cc ...")
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        try:
            if os.statvfs(path.parent).f_bavail == 0:  # what torch's message leaves out
                reason = os.strerror(errno.ENOSPC)
        except OSError:
            pass
    return CheckpointWriteError(f"cannot write checkpoint {path} ({reason}); the previous {path.name}, if any, "
                                f"is kept")


def _compact(obj: Any) -> Any:
    """`obj` with every tensor that views a larger storage replaced by a copy of itself: torch.save writes whole
    storages, so a batch member's parameters (views of all members': algo/fast/stacked.py) would carry the others'.
    Containers keep their type and attributes (a state_dict's OrderedDict and its _metadata)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.untyped_storage().nbytes() > obj.numel() * obj.element_size() else obj
    if isinstance(obj, dict):
        out = copy.copy(obj)
        for key, value in obj.items():
            out[key] = _compact(value)
        return out
    if isinstance(obj, list):
        return [_compact(v) for v in obj]
    if isinstance(obj, tuple):
        items = [_compact(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def save(payload: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write atomically: a temporary file in the same folder, fsync, then os.replace over `path`.

    A crash or SIGKILL at any moment leaves either the previous file or the new one, never half of one. A failed
    write (OSError, or torch's RuntimeError) raises CheckpointWriteError, a UserError, and leaves the previous
    file in place.
    """
    path = Path(path)
    data = _compact({"format": FORMAT, "format_version": FORMAT_VERSION, "ppo_cli_version": __version__, **payload})
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-save
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp's 0600 would make checkpoints unreadable to teammates
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError) as exc:
        raise _write_failure(path, exc) from None
    finally:
        if tmp is not None:
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:
                pass
    return path


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a checkpoint; every failure is one UserError naming the file and the problem."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {str(p)!r} does not exist")
    if p.is_dir():
        hint = " (did you mean checkpoints/checkpoint.pt inside it?)" if (p / "checkpoints").is_dir() else ""
        raise UserError(f"checkpoint {str(p)!r} is a directory, not a file{hint}")
    if p.stat().st_size == 0:
        raise UserError(f"checkpoint {str(p)!r} is empty")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a foreign file
            warnings.simplefilter("ignore")
            data = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        blocked = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported global" in ln), None)
        if blocked:
            raise UserError(f"checkpoint {str(p)!r} contains Python objects that could run code when loaded; "
                            f"refused, nothing was run ({blocked[:160]})") from None
        detail = next((ln for ln in lines if "Unsupported" in ln), lines[0] if lines else type(exc).__name__)
        raise UserError(f"checkpoint {str(p)!r} is truncated or corrupt, or not a torch file "
                        f"({detail[:160]})") from None
    except Exception as exc:  # noqa: BLE001 - unpickling arbitrary bytes can fail in any way; all mean "corrupt"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"checkpoint {str(p)!r} is truncated or corrupt ({first[:160]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"checkpoint {str(p)!r} is not a ppo-cli checkpoint (no '{FORMAT}' format tag)")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"checkpoint {str(p)!r} has format version {recipe_show(repr(version))}, not a whole number: "
                        f"the file is damaged or was not written by ppo-cli")
    if version > FORMAT_VERSION:
        raise UserError(f"checkpoint {str(p)!r} has format version {version!r}, newer than this ppo-cli reads "
                        f"({FORMAT_VERSION}); upgrade ppo-cli (it was written by {data.get('ppo_cli_version')})")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise UserError(f"checkpoint {str(p)!r} is incomplete: missing {', '.join(missing)}")
    if version < 2 and isinstance(data["policy"], dict):
        data["policy"] = migrate_v1_state(data["policy"])
    return data


def check_resumable(data: dict[str, Any], world: int, spaces: tuple[dict[str, Any], dict[str, Any]],
                    label: str) -> None:
    """Refuse, in one line, to resume a checkpoint on an env of other spaces (`spaces`: the env's, described), in a
    run of another number of processes than wrote it, or one that lacks the other ranks' parts."""
    if not (same_space(data["observation_space"], spaces[0]) and same_space(data["action_space"], spaces[1])):
        raise UserError(f"cannot resume: the checkpoint's spaces ({data['observation_space']}, "
                        f"{data['action_space']}) differ from {label!r}'s")
    saved_world = int(data.get("world_size", 1))
    if saved_world != world:
        raise UserError(f"cannot resume: the checkpoint is of a {saved_world}-process run and this run has "
                        f"{world}; resume with torchrun --nproc_per_node={saved_world} (ppo-eval evaluates it as "
                        f"it is, and a new run can start from scratch with any number)")
    if saved_world > 1 and data.get("ranks") is None:
        raise UserError(f"cannot resume: the checkpoint holds only rank 0's part of a {saved_world}-process run's "
                        f"state (a best.pt written before ppo-cli kept every rank's); resume the run's "
                        f"checkpoint.pt, or evaluate this one with ppo-eval")
