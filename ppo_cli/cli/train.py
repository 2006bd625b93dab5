"""`ppo-train`: compose the config with Hydra, check it, train, and report.

Everything the user can fix arrives here as a UserError and leaves as one line on stderr with exit code 2.
Hydra would print a traceback (or several lines) for any exception escaping it, so main() asks Hydra to raise
instead (HYDRA_FULL_ERROR) and reports what arrives: a UserError, a YAML syntax error in a config file, or one
of Hydra's own composition errors, each as one line.

Run folders: a default folder is created fresh by the `fresh_dir` resolver (conf/config.yaml), a run holds an
exclusive lock on its folder while it runs, and a folder that already holds a run (checkpoints/, result.json,
TensorBoard events) is refused unless resuming. A run that fails before writing anything removes the folders
it created.
"""

from __future__ import annotations

import difflib
import importlib.util
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ppo_cli import __version__, distributed
from ppo_cli.cli import sweep_report
from ppo_cli.config import (
    GROUPS,
    TrainConfig,
    choice,
    config_from_yaml,
    env_label,
    register_configs,
    stored_config,
    validate,
)
from ppo_cli.devices import choose_device, precision_text, torch_threads
from ppo_cli.envs import recipe
from ppo_cli.envs.make import check_env
from ppo_cli.errors import UserError, extra_hint
from ppo_cli.run import checkpoint
from ppo_cli.run.runner import Runner, TrainResult
from ppo_cli.run.signals import Interrupted

try:
    import fcntl
except ImportError:  # Windows: runs go unlocked
    fcntl = None  # type: ignore[assignment]

register_configs()


class RunFolderTaken(UserError):
    """The run folder holds another run, or another ppo-train is running in it; nothing of it is touched."""


# --- run folders ------------------------------------------------------------------------------------------

_CREATED: list[Path] = []  # folders this process created for its run, outermost first
_FRESH: dict[str, str] = {}  # fresh_dir's answers: Hydra resolves the run folder more than once
_LOCKS: dict[Path, int] = {}  # run folder -> the descriptor holding its lock
HYDRA_RECORD = {"config.yaml", "hydra.yaml", "overrides.yaml"}


def _reason(exc: OSError) -> str:
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
            raise UserError(f"cannot create the run folder {base} ({_reason(exc)})") from None
    return _FRESH[base]


OmegaConf.register_new_resolver("fresh_dir", fresh_dir, use_cache=True, replace=True)


def _holds_run(folder: Path) -> list[str]:
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


def _unlock(folder: Path) -> None:
    fd = _LOCKS.pop(folder.absolute(), None)
    if fd is not None:
        os.close(fd)


def claim(folder: Path, resuming: bool, multirun: bool = False) -> None:
    """Lock the run folder, and refuse one that holds another run unless this run resumes it."""
    _lock(folder)
    held = [] if resuming else _holds_run(folder)
    if held:
        _unlock(folder)
        where = ("give the sweep a new hydra.sweep.dir" if multirun else
                 f"start this run in a new folder (leave out hydra.run.dir, or name a new one), or continue that "
                 f"run: ppo-train resume={folder / 'checkpoints' / 'checkpoint.pt'}")
        raise RunFolderTaken(f"run folder {folder} already holds a run ({', '.join(held)}); {where}")


def _discard_failed_start() -> None:
    """Remove the folders this process created, where the failed run left nothing but Hydra's record."""
    for folder in reversed(_CREATED):
        _unlock(folder)
        record = folder / ".hydra"
        try:
            if {p.name for p in folder.iterdir()} <= {".hydra"}:
                if record.is_dir() and {p.name for p in record.iterdir()} <= HYDRA_RECORD:
                    shutil.rmtree(record)
                folder.rmdir()
        except OSError:  # gone already, not empty, or not ours to remove: leave it
            continue
    _CREATED.clear()


def _prepare_named_folder(argv: list[str]) -> None:
    """A folder named on the command line (hydra.run.dir / hydra.sweep.dir) is checked before Hydra writes its
    record (.hydra/) into it: it must be writable and hold no other run (unless resuming)."""
    if any(a.split("=", 1)[0] in INFO_FLAGS for a in argv):
        return
    multirun = _is_multirun(argv)
    prefix = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    named = [a[len(prefix):] for a in argv if a.startswith(prefix)]
    if not named or "${" in named[-1]:
        return
    folder = Path(named[-1])
    if multirun and folder.is_dir():
        jobs = sorted(d.name for d in folder.iterdir() if d.is_dir() and _holds_run(d))
        if jobs or (folder / "optimization_results.yaml").exists():
            raise RunFolderTaken(f"sweep folder {folder} already holds a sweep (jobs {', '.join(jobs) or '-'}); "
                                 f"give this sweep a new hydra.sweep.dir")
    try:
        _mkdirs(folder)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to the {'sweep' if multirun else 'run'} folder {folder} "
                        f"({_reason(exc)})") from None
    if not multirun:
        claim(folder, resuming=_resuming(argv))


def _resuming(argv: list[str]) -> bool:
    return any(a.startswith("resume=") and a.split("=", 1)[1] not in ("", "null", "None") for a in argv)


def _is_multirun(argv: list[str]) -> bool:
    return "-m" in argv or "--multirun" in argv


# Hydra flags that only show things: no run, no folder.
INFO_FLAGS = ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--shell-completion", "-sc",
              "--resolve")


def config_for_resume(data: dict, composed: DictConfig, overridden: list[str]) -> DictConfig:
    """The checkpoint's config, with the keys the user set on this command line taken from `composed`."""
    cfg = config_from_yaml(data["config_yaml"])
    for key in overridden:
        if key == "resume":
            continue
        if key in GROUPS:
            raise UserError(f"cannot change the config group {key!r} when resuming; override single keys "
                            f"(e.g. {key}.<name>=...) or start a new run")
        OmegaConf.update(cfg, key, OmegaConf.select(composed, key), merge=False)
    cfg.resume = composed.resume
    return cfg  # type: ignore[return-value]


def _overridden_keys() -> list[str]:
    keys = []
    for item in HydraConfig.get().overrides.task:
        key = item.split("=", 1)[0].lstrip("+~")
        keys.append(key)
    return keys


def run(cfg: DictConfig, run_dir: Path) -> TrainResult:
    data = None
    if cfg.resume:
        data = checkpoint.load(cfg.resume)
        overridden = _overridden_keys()
        # The user's word on this command line, never the checkpoint's; the keys they set are theirs.
        recipe.check(stored_config(data["config_yaml"]), trusted=bool(cfg.trust_env_code), what="checkpoint",
                     source=str(cfg.resume), how="trust_env_code=true (or set those keys on the command line)",
                     named=overridden)
        cfg = config_for_resume(data, cfg, overridden)
    validate(cfg)
    banner(cfg, run_dir, int(data["global_step"]) if data else 0)
    if cfg.env.check:
        findings = check_env(cfg.env)
        print(f"env.check: {env_label(cfg.env)!r} passes gymnasium's env checker"
              + (" with warnings:" if findings else ""), flush=True)
        for line in findings:
            print(f"  - {line}", flush=True)
    trainer = Runner(cfg, run_dir, resume=data)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    return result


def banner(cfg: DictConfig, run_dir: Path, start_step: int = 0) -> None:
    """Before training: where the run goes, what it trains, and how many steps it will take (whole updates)."""
    a, e = cfg.algo, cfg.env
    world = distributed.from_environment().world
    rollout = a.n_steps * e.num_envs * world
    updates = max(-(-(a.total_timesteps - start_step) // rollout), 0)
    end = start_step + updates * rollout
    device = choose_device(cfg)
    n = f"{updates:,}{' more' if start_step else ''} {'update' if updates == 1 else 'updates'} of {rollout:,}"
    steps = f"from step {start_step:,} to {end:,} = {n}" if start_step else f"{end:,} steps = {n}"
    if end != a.total_timesteps and updates:
        steps += (f" (algo.total_timesteps={a.total_timesteps:,} is not a whole number of rollouts: the run stops "
                  f"after the update that reaches it)")
    vectorized = "envpool" if choice(e.backend) == "envpool" else choice(e.vectorization)
    n_threads = torch_threads(cfg)
    threads = "" if device.device.type != "cpu" or not n_threads else (
        f", {n_threads} torch thread{'s' if n_threads > 1 else ''}")
    print(f"run dir:    {run_dir}\n"
          f"env:        {env_label(e)} x {e.num_envs} envs ({vectorized}), seed {cfg.seed}\n"
          f"device:     {device.device.type} ({device.reason}){threads}{precision_text(cfg, device.device)}\n"
          f"rollout:    algo.n_steps {a.n_steps:,} x env.num_envs {e.num_envs}"
          f"{f' x {world} processes' if world > 1 else ''} = {rollout:,} steps per update; "
          f"algo.batch_size {a.batch_size}, algo.K_epochs {a.K_epochs}\n"
          f"training:   {steps}", flush=True)


def _report(result: TrainResult, run_dir: Path) -> float:
    ev = result.final_eval
    m, s = divmod(int(result.wall_time), 60)
    print(f"done: {result.global_step:,} steps in {m}m{s:02d}s of training ({result.sps:,.0f} SPS)"
          + (f", plus {result.eval_seconds:.1f} s evaluating" if result.eval_seconds else ""))
    if result.stopped_at:
        step, secs = result.stopped_at
        print(f"stopped early: eval.stop_at_return reached at step {step:,} after {secs:.1f} s of training")
    if result.best_eval:
        b = result.best_eval
        print(f"best evaluation: {b['mean_return']:.2f} +/- {b['std_return']:.2f} at step {b['global_step']:,} "
              f"(checkpoints/best.pt)")
    if ev is not None:
        print(f"final evaluation ({len(ev.returns)} episodes): {ev.mean_return:.2f} +/- {ev.std_return:.2f}")
    print(f"run dir:    {run_dir}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"evaluate:   ppo-eval {result.checkpoint}")
    _write_result(run_dir, {
        "status": "ok",
        "objective": result.objective if math.isfinite(result.objective) else None,
        "global_step": result.global_step,
        "wall_time": result.wall_time,
        "eval_seconds": result.eval_seconds,
        "sps": result.sps,
        "final_eval": ev.summary() if ev is not None else None,
        "best_eval": result.best_eval,
        "stopped_at_step": result.stopped_at[0] if result.stopped_at else None,
        "recent_train_return": result.recent_return,
        "checkpoint": str(result.checkpoint),
    })
    return result.objective


def _write_result(run_dir: Path, fields: dict) -> None:
    """result.json: what ppo-sweep-report reads. Written whole to a temp file and renamed, so a reader of a
    sweep still in progress never sees half a file."""
    hydra_cfg = HydraConfig.get()
    payload = {**fields, "overrides": list(hydra_cfg.overrides.task), "job": hydra_cfg.job.get("num")}
    tmp = run_dir / "result.json.tmp"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, run_dir / "result.json")
    except OSError as exc:
        raise UserError(f"cannot write {run_dir / 'result.json'} ({_reason(exc)})") from None


def _failed(run_dir: Path, reason: str, started: float) -> None:
    """Record a failed sweep job. It returns None, not NaN: the Optuna sweeper (with optuna 2.x) crashes on a
    NaN objective, while None makes it record the trial as failed; the grid sweeper ignores what jobs return."""
    _write_result(run_dir, {"status": "failed", "error": reason, "objective": None,
                            "wall_time": time.perf_counter() - started})


@hydra.main(version_base="1.3", config_path="pkg://ppo_cli.conf", config_name="config")
def _task(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    started = time.perf_counter()
    try:
        claim(run_dir, resuming=bool(cfg.resume), multirun=multirun)
        return _report(run(cfg, run_dir), run_dir)
    except RunFolderTaken as exc:  # the folder is another run's: its result.json is not this job's to write
        print(f"ppo-train: error: {exc}", file=sys.stderr, flush=True)
        if multirun:
            return None
        sys.exit(2)
    except UserError as exc:
        print(f"ppo-train: error: {exc}", file=sys.stderr, flush=True)
        if multirun:  # one bad job must not end the sweep: the job is recorded as failed and the sweep goes on
            return _failed(run_dir, str(exc), started)
        _discard_failed_start()
        sys.exit(2)
    except Interrupted as exc:  # exit 130 (SIGINT) or 143 (SIGTERM), as the shell reports a process they ended
        print(f"ppo-train: {exc}", file=sys.stderr, flush=True)
        sys.exit(128 + exc.signum)
    except Exception as exc:
        if not multirun:
            raise
        # In a sweep, an unexpected crash of one job is recorded as that job's failure, and the sweep goes on.
        reason = f"{type(exc).__name__}: {exc}"
        print(f"ppo-train: job failed: {reason}", file=sys.stderr, flush=True)
        return _failed(run_dir, reason, started)
    finally:
        if multirun:  # the next job of this process may not need it, but nothing else may take it meanwhile
            _unlock(run_dir)


def _resume_run_dir(argv: list[str]) -> list[str]:
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


FREE_FORM = ("env.kwargs.",)  # dicts whose keys the schema cannot know


def _open_free_form(argv: list[str]) -> list[str]:
    """`env.kwargs.continuous=true` means add-or-set; Hydra would demand a `+` for a key not in the preset."""
    return [f"++{a}" if a.startswith(FREE_FORM) and "=" in a else a for a in argv]


SECTIONS = (*GROUPS, "eval")  # keys that hold keys: never the suggestion for a mistyped key
SWEEP_PARAMS = "hydra.sweeper.params."  # the Optuna sweeper's search space: its keys are config keys


def check_overrides(argv: list[str]) -> None:
    """Reject unknown keys and wrong types in one line, with a suggestion, before Hydra composes.

    `+key=value` and `++key=value` are checked like `key=value`: the schema has every key, so a `+` cannot add
    one (a run would train without it, and its checkpoint would not load); only the free-form dicts
    (env.kwargs) take new keys. `~key` cannot remove a key either. Group choices (env=...), hydra.* keys and
    malformed syntax are left to Hydra, except the keys of an Optuna search space (hydra.sweeper.params.<key>).
    """
    schema = OmegaConf.structured(TrainConfig)
    parser = OverridesParser.create()
    known = _leaf_keys(schema)
    for arg in argv:
        prefix = arg[:len(arg) - len(arg.lstrip("+~"))]
        if arg.startswith("-") or ("=" not in arg and prefix != "~"):
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # noqa: BLE001 - malformed syntax: Hydra's own message explains it best
            continue
        key = override.key_or_group
        where = ""
        if key.startswith(SWEEP_PARAMS):
            key, where = key[len(SWEEP_PARAMS):], f" in {SWEEP_PARAMS.rstrip('.')}"
        elif key.startswith(("hydra.", "hydra/")) or key == "hydra":
            continue
        if "/" in key or "@" in key or key in GROUPS or key.startswith(FREE_FORM):
            continue
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known - set(SECTIONS)), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else " (see the key tables in docs/configuration.md)"
            plus = "; a '+' cannot add keys: only env.kwargs takes new ones" if "+" in prefix else ""
            raise UserError(f"unknown config key {key!r}{where}{hint}{plus}")
        if where:
            continue
        if prefix == "~":
            raise UserError(f"{arg}: config keys cannot be removed; set {key}=<value> instead")
        if prefix == "+":
            raise UserError(f"{arg}: {key} is already in the config; set it without the '+': {arg[1:]}")
        if override.is_sweep_override():
            continue
        try:
            OmegaConf.update(schema, key, override.value(), merge=False)
        except Exception as exc:  # noqa: BLE001 - OmegaConf's validation errors have no common base we can name
            first = str(exc).strip().splitlines()[0]
            if "Integer" in first and isinstance(override.value(), float):
                first = "must be an integer (write 100000 or 100_000, not 1e5)"
            members = _enum_members(schema, key)
            if members and "expected one of" in first:  # OmegaConf lists aliases (async_) too
                first = f"expected one of [{', '.join(members)}]"
            raise UserError(f"{arg}: {first}") from None


def _enum_members(schema: DictConfig, key: str) -> list[str]:
    """The member names of an enum-typed key, aliases left out; [] for other keys."""
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(schema, parent_key) if parent_key else schema
    node = parent._get_node(name) if isinstance(parent, DictConfig) else None
    enum_type = getattr(node, "enum_type", None)
    return [m.name for m in enum_type] if enum_type is not None else []


def _leaf_keys(node: DictConfig, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for k in node.keys():
        full = f"{prefix}{k}"
        keys.add(full)
        child = node._get_node(k)
        if isinstance(child, DictConfig) and not full.startswith("env.kwargs"):
            keys |= _leaf_keys(child, full + ".")
    return keys


# Config groups that exist only with the sweep extra installed: (override prefix, plugin module).
SWEEP_PLUGINS = (("hydra/sweeper=ppo_", "hydra_plugins.hydra_optuna_sweeper"),
                 ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper"),
                 ("hydra/launcher=joblib", "hydra_plugins.hydra_joblib_launcher"),
                 ("hydra/launcher=submitit", "hydra_plugins.hydra_submitit_launcher"))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        return False


def check_sweep_plugins(argv: list[str]) -> None:
    for arg in argv:
        for prefix, module in SWEEP_PLUGINS:
            if arg.startswith(prefix) and not _installed(module):
                raise UserError(f"{arg} needs a Hydra plugin that is not installed ({module.split('.')[-1]}); "
                                f"{extra_hint('sweep')}")
        if arg.startswith("hydra/launcher=submitit_slurm") and shutil.which("srun") is None:
            raise UserError(f"{arg}: Slurm's srun is not on this machine's PATH; run the sweep from a Slurm login "
                            f"node (hydra/launcher=submitit_local runs the same jobs here)")


def _user_configs_first(argv: list[str]) -> list[str]:
    """`--config-dir DIR`: a config in DIR wins over the packaged one of the same name.

    Hydra searches --config-dir after the packaged configs (pkg://ppo_cli.conf, the "main" entry of its search
    path), so a preset copied into DIR under its own name (hydra/sweeper/ppo_random.yaml, env/CartPole-v1.yaml,
    even config.yaml) would silently lose to the packaged one. Instead DIR goes into the search path just before
    the packaged configs. Hydra has no public hook for that order, so this wraps the function that builds the
    search path (hydra._internal.utils, hydra-core 1.3); without it, --config-dir keeps Hydra's order.
    """
    out: list[str] = []
    user_dir = None
    args = iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in ("--config-dir", "-cd"):
            user_dir = value if eq else next(args, None)
            if not user_dir:
                raise UserError(f"{flag} needs a folder")
        else:
            out.append(arg)
    if user_dir is None:
        return argv
    folder = Path(user_dir).resolve()
    if not folder.is_dir():
        raise UserError(f"--config-dir {user_dir}: no such folder")
    from hydra._internal import utils as hydra_internal
    from hydra.core.config_search_path import SearchPathQuery

    build = getattr(hydra_internal, "create_automatic_config_search_path", None)
    if build is None:
        return argv

    def user_dir_first(*args: Any, **kwargs: Any) -> Any:
        search_path = build(*args, **kwargs)
        search_path.prepend(provider="command-line", path=f"file://{folder}", anchor=SearchPathQuery(provider="main"))
        return search_path

    hydra_internal.create_automatic_config_search_path = user_dir_first
    return out


def _find(exc: BaseException, kind: type) -> Any:
    """`exc` or the first exception of type `kind` that it was raised from (Hydra and OmegaConf wrap them)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _yaml_message(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[-1]
    context = getattr(exc, "context", None)
    if mark is None:
        return f"a config file is not valid YAML ({problem})"
    context_mark = getattr(exc, "context_mark", None)
    started = (f" ({context} at line {context_mark.line + 1})" if context and context_mark is not None
               and context_mark.line != mark.line else "")
    return f"{mark.name}: not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}{started}"


def _hydra_message(exc: CompactHydraException) -> str:
    """One of Hydra's composition errors, as one line."""
    if isinstance(exc, MissingConfigException) and exc.options:
        first = str(exc).strip().splitlines()[0]
        return f"{first}; the options are: {', '.join(exc.options)}"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        lines.append(f"({str(cause).strip().splitlines()[0]})")
    return " ".join(lines) or type(exc).__name__


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"ppo-train: error: {message}", file=sys.stderr, flush=True)
    _discard_failed_start()
    sys.exit(code)


def sweep_summary(sweep_dir: Path) -> bool:
    """Print how the sweep went; True when no job succeeded."""
    try:
        jobs = sweep_report.find_jobs(sweep_dir, quiet=True)
    except UserError:
        jobs = []
    ok = [j for j in jobs if j.status == "ok"]
    failed = len(jobs) - len(ok)
    line = f"sweep: {len(jobs)} jobs, {len(ok)} done, {failed} failed"
    if ok:
        best = max(ok, key=lambda j: j.objective)  # type: ignore[arg-type, return-value]
        line += f"; best objective {best.objective:.2f} (job {best.name})"
    print(line, flush=True)
    print(f"report:     ppo-sweep-report {sweep_dir}", flush=True)
    return not ok


def main() -> None:
    if distributed.from_environment().active:
        distributed.exit_after(_main)  # ends the process itself: why in exit_after
    else:
        _main()


def _main() -> None:
    argv = sys.argv[1:]
    if "--version" in argv:
        print(f"ppo-cli {__version__}")
        return
    argv = distributed.prepare_cli(argv)  # under torchrun: ranks other than 0 stay quiet
    user_wants_tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises what goes wrong instead of printing it; reported below
    multirun = _is_multirun(argv)
    try:
        argv = _user_configs_first(_open_free_form(_resume_run_dir(argv)))
        check_sweep_plugins(argv)
        check_overrides(argv)
        _prepare_named_folder(argv)
        sys.argv = [sys.argv[0], *argv]
        _task()
    except KeyboardInterrupt:  # Ctrl-C outside Runner.run (which stops at an update boundary): nothing to save
        print("ppo-train: interrupted by SIGINT while starting or closing the run; checkpoints already written are "
              "kept", file=sys.stderr, flush=True)
        _discard_failed_start()
        sys.exit(130)
    except Exception as exc:
        user = _find(exc, UserError)
        if user is not None:
            _fail(str(user))
        if user_wants_tracebacks:
            raise
        syntax = _find(exc, yaml.YAMLError)
        if syntax is not None:
            _fail(_yaml_message(syntax))
        if isinstance(exc, CompactHydraException):
            _fail(_hydra_message(exc))
        sweep_dir = sweep_report.RecordSweepDir.last if multirun else None
        if sweep_dir is not None and sweep_dir.is_dir() and sweep_summary(sweep_dir):
            # e.g. the Optuna sweeper, asked for its best trial when every trial failed
            _fail(f"every job of the sweep failed (see each job's result.json in {sweep_dir})", 1)
        if distributed.from_environment().active:  # one line per rank (stderr names it), not N tracebacks
            first = (str(exc).strip().splitlines() or [""])[0]
            _fail(f"{type(exc).__name__}: {first}", 1)
        raise
    if multirun and not any(a.split("=", 1)[0] in INFO_FLAGS for a in argv):
        sweep_dir = sweep_report.RecordSweepDir.last
        if sweep_dir is not None and sweep_summary(sweep_dir):
            _fail(f"every job of the sweep failed (see each job's result.json in {sweep_dir})", 1)


if __name__ == "__main__":
    main()
