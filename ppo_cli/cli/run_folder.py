"""Run folders: a default folder is created fresh by the `fresh_dir` resolver (conf/config.yaml), a run holds an
exclusive lock on its folder while it runs, and a folder that already holds a run (checkpoints/, result.json,
TensorBoard events) is refused unless resuming. A run that fails before writing anything removes the folders
it created."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from ppo_cli.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: runs go unlocked
    fcntl = None  # type: ignore[assignment]

# Hydra flags that only show things: no run, no folder.
INFO_FLAGS = ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--shell-completion", "-sc",
              "--resolve")


class RunFolderTaken(UserError):
    """The run folder holds another run, or another ppo-train is running in it; nothing of it is touched."""


_CREATED: list[Path] = []  # folders this process created for its run, outermost first
_FRESH: dict[str, str] = {}  # fresh_dir's answers: Hydra resolves the run folder more than once
_LOCKS: dict[Path, int] = {}  # run folder -> the descriptor holding its lock
HYDRA_RECORD = {"config.yaml", "hydra.yaml", "overrides.yaml"}


def reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _mkdirs(path: Path) -> None:
    """Create `path` and its missing parents, remembering each one created here."""
    for p in reversed([p for p in (path, *path.parents) if not p.exists()]):
        try:
            p.mkdir()
        except FileExistsError:
            continue
        _CREATED.append(p.absolute())


def fresh_dir(base: str) -> str:
    """`base`, or `base_2`, `base_3`, ...: the first that did not exist, created here.

    mkdir either creates a folder or fails, atomically, so runs started in the same second (the default folder
    is runs/<date>/<time>) each get a folder of their own.
    """
    if base not in _FRESH:
        path = Path(base)
        try:
            _mkdirs(path.parent)
            for n in itertools.count(1):
                candidate = path if n == 1 else path.with_name(f"{path.name}_{n}")
                try:
                    candidate.mkdir()
                except FileExistsError:
                    continue
                _CREATED.append(candidate.absolute())
                _FRESH[base] = str(candidate)
                break
        except OSError as exc:
            raise UserError(f"cannot create the run folder {base} ({reason(exc)})") from None
    return _FRESH[base]


OmegaConf.register_new_resolver("fresh_dir", fresh_dir, use_cache=True, replace=True)


def holds_run(folder: Path) -> list[str]:
    """What in `folder` belongs to a run: a checkpoints/ folder, result.json, TensorBoard event files."""
    found = [name for name in ("checkpoints/", "result.json") if (folder / name.rstrip("/")).exists()]
    if any(folder.glob("events.out.tfevents.*")):
        found.append("TensorBoard events")
    return found


def _lock(folder: Path) -> None:
    """Hold an exclusive lock on the run folder while this process lives: a second ppo-train on it stops."""
    folder = folder.absolute()
    if fcntl is None or folder in _LOCKS:
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderTaken(f"run folder {folder} is in use by another ppo-train that is still running; wait "
                             f"for it to end, or give this run another folder") from None
    except OSError:  # a file system without flock (some network mounts): go on unlocked
        os.close(fd)
        return
    _LOCKS[folder] = fd


def unlock(folder: Path) -> None:
    fd = _LOCKS.pop(folder.absolute(), None)
    if fd is not None:
        os.close(fd)


def claim(folder: Path, resuming: bool, multirun: bool = False) -> None:
    """Lock the run folder, and refuse one that holds another run unless this run resumes it."""
    _lock(folder)
    held = [] if resuming else holds_run(folder)
    if held:
        unlock(folder)
        where = ("give the sweep a new hydra.sweep.dir" if multirun else
                 f"start this run in a new folder (leave out hydra.run.dir, or name a new one), or continue that "
                 f"run: ppo-train resume={folder / 'checkpoints' / 'checkpoint.pt'}")
        raise RunFolderTaken(f"run folder {folder} already holds a run ({', '.join(held)}); {where}")


def discard_failed_start() -> None:
    """Remove the folders this process created, where the failed run left nothing but Hydra's record."""
    for folder in reversed(_CREATED):
        unlock(folder)
        record = folder / ".hydra"
        try:
            if {p.name for p in folder.iterdir()} <= {".hydra"}:
                if record.is_dir() and {p.name for p in record.iterdir()} <= HYDRA_RECORD:
                    shutil.rmtree(record)
                folder.rmdir()
        except OSError:  # gone already, not empty, or not ours to remove: leave it
            continue
    _CREATED.clear()


TUNE_MARKER = "ppo_tune.yaml"  # a ppo_tune sweep's folder: where its study is (cli/tune.py writes it at the start)


def prepare_named_folder(argv: list[str]) -> None:
    """A folder named on the command line (hydra.run.dir / hydra.sweep.dir) is checked before Hydra writes its
    record (.hydra/) into it: it must be writable and hold no other run (unless resuming)."""
    if any(a.split("=", 1)[0] in INFO_FLAGS for a in argv):
        return
    multirun = is_multirun(argv)
    prefix = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    named = [a[len(prefix):] for a in argv if a.startswith(prefix)]
    if not named or "${" in named[-1]:
        return
    folder = Path(named[-1])
    # A ppo_tune study goes on in its folder: its jobs' folders are numbered by trial, so none is written twice.
    tuning = any(a.startswith("hydra/sweeper=ppo_") and a != "hydra/sweeper=ppo_pbt" for a in argv)
    if multirun and folder.is_dir() and not (tuning and (folder / TUNE_MARKER).is_file()):
        jobs = sorted(d.name for d in folder.iterdir() if d.is_dir() and holds_run(d))
        if jobs or (folder / "optimization_results.yaml").exists():
            raise RunFolderTaken(f"sweep folder {folder} already holds a sweep (jobs {', '.join(jobs) or '-'}); "
                                 f"give this sweep a new hydra.sweep.dir")
    try:
        _mkdirs(folder)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to the {'sweep' if multirun else 'run'} folder {folder} "
                        f"({reason(exc)})") from None
    if not multirun:
        claim(folder, resuming=resuming(argv))


def resuming(argv: list[str]) -> bool:
    return any(a.startswith("resume=") and a.split("=", 1)[1] not in ("", "null", "None") for a in argv)


def is_multirun(argv: list[str]) -> bool:
    return "-m" in argv or "--multirun" in argv


def resume_run_dir(argv: list[str]) -> list[str]:
    """`resume=.../<run>/checkpoints/checkpoint.pt` continues in <run>: same TensorBoard curves, same folder.

    Hydra's own .hydra/ record is not rewritten there: the config of a resumed run is the checkpoint's.
    """
    resume = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), None)
    if not resume or any(a.startswith("hydra.run.dir=") for a in argv) or "-m" in argv or "--multirun" in argv:
        return argv
    ckpt = Path(resume)
    if ckpt.parent.name != "checkpoints" or not ckpt.is_file():
        return argv
    return [*argv, f"hydra.run.dir={ckpt.parent.parent}", "hydra.output_subdir=null"]
