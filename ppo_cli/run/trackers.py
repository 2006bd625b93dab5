"""Experiment trackers beside TensorBoard (`logger.backends`): Weights & Biases and MLflow, each an optional extra
(docs/trackers.md). TensorBoard is always written: it is the run folder's own record, which ppo-sweep-report reads.

Each tracker gets what TensorBoard gets: every scalar at its step, the doctor's warnings as text, the resolved
config (W&B's config, MLflow's params) and, as the run closes, its checkpoints as artifacts. A resumed run
continues the same tracker run: the ids are kept in the run folder (`trackers.json`). A sweep's jobs share a
group (W&B) or a `sweep` tag (MLflow). A tracker that is not installed or cannot be reached is one line, and the
run goes on without it, unless `logger.strict=true`, where it stops the run in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from omegaconf import OmegaConf

from ppo_cli.config import choice, env_label
from ppo_cli.errors import UserError, first_line

IDS_FILE = "trackers.json"
BACKENDS = ("tensorboard", "wandb", "mlflow")
EXTRAS = {"wandb": 'pip install ".[wandb]"', "mlflow": 'pip install ".[mlflow]"'}


class Tracker(Protocol):
    name: str
    run_id: str
    last_step: int  # the last step it was given, kept in trackers.json: a resume from before it starts a new run
    where: dict[str, str]  # what else a resume needs to find the run (MLflow's store)

    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def text(self, tag: str, text: str, step: int) -> None: ...

    def close(self, artifacts: list[Path], failed: bool) -> None: ...


class WandbTracker:
    name = "wandb"

    def __init__(self, settings: Any, run_dir: Path, config: dict[str, Any], saved: dict[str, Any] | None,
                 group: str | None, tags: dict[str, str]) -> None:
        import wandb

        run_id = (saved or {}).get("id")
        self.wandb = wandb
        self.run = wandb.init(project=settings.project, entity=settings.entity, group=settings.group or group,
                              tags=[*settings.tags, *(f"{k}:{v}" for k, v in tags.items())], dir=str(run_dir),
                              config=config, id=run_id, resume="allow" if run_id else None,
                              mode=settings.mode, name=run_dir.name, reinit="finish_previous")
        self.run_id, self.where = self.run.id, {}
        self.last_step = int((saved or {}).get("step", -1))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(dict(values), step=step)
        self.last_step = max(self.last_step, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{text}</pre>")}, step=step)

    def close(self, artifacts: list[Path], failed: bool) -> None:
        try:
            if artifacts:
                artifact = self.wandb.Artifact(f"checkpoints-{self.run_id}", type="model")
                for path in artifacts:
                    artifact.add_file(str(path))
                self.run.log_artifact(artifact)
        finally:
            self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    name = "mlflow"

    def __init__(self, settings: Any, run_dir: Path, config: dict[str, Any], saved: dict[str, Any] | None,
                 group: str | None, tags: dict[str, str]) -> None:
        import mlflow

        run_id = (saved or {}).get("id")
        self.where = {"uri": (saved or {}).get("uri") or absolute_uri(settings.tracking_uri)}
        _reachable(self.where["uri"])
        self.client = mlflow.MlflowClient(self.where["uri"])
        self.last_step = int((saved or {}).get("step", -1))
        if run_id is None:
            experiment = self.client.get_experiment_by_name(settings.experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(settings.experiment))
            all_tags = {**tags, **({"sweep": group} if group else {}), "mlflow.runName": run_dir.name}
            run = self.client.create_run(experiment_id, tags=all_tags)
            self.run_id = run.info.run_id
            # MLflow's params are strings of at most 6,000 characters, set once.
            params = {k: str(v)[:6000] for k, v in _flat(config).items()}
            for start in range(0, len(params), 100):
                chunk = dict(list(params.items())[start:start + 100])
                self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, v) for k, v in chunk.items()])
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        self.entities = mlflow.entities

    def scalars(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.entities.Metric(k, float(v), now, step)
                                                    for k, v in values.items()])
        self.last_step = max(self.last_step, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step_{step}.txt")

    def close(self, artifacts: list[Path], failed: bool) -> None:
        try:
            for path in artifacts:
                self.client.log_artifact(self.run_id, str(path), "checkpoints")
        finally:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


TRACKERS: dict[str, Callable[..., Tracker]] = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def sweep_group(run_dir: Path) -> str | None:
    """The sweep a job belongs to (its folder's name, where Hydra wrote multirun.yaml beside the jobs), or None."""
    return run_dir.parent.name if (run_dir.parent / "multirun.yaml").is_file() else None


def run_tags(cfg: Any) -> dict[str, str]:
    """What a tracker's run is tagged with: the env, the algorithm and the code's git commit (where there is one)."""
    tags = {"env": str(env_label(cfg.env)), "algo": "ppo"}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return tags
    if commit.returncode == 0 and commit.stdout.strip():
        tags["git"] = commit.stdout.strip()
    return tags


def _reachable(uri: str, timeout: float = 10.0) -> None:
    """A tracking server that does not answer, found in one request: MLflow's client would retry it for minutes,
    printing each retry."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()  # noqa: S310 - the user's URL
    except urllib.error.HTTPError:  # it answered, if not with a health page (a proxy): reachable
        return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"{uri} does not answer ({reason})") from None


def absolute_uri(uri: str) -> str:
    """A SQLite store named relative to the working folder, made absolute: a resume from elsewhere finds it."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _saved(run_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        saved = json.loads((run_dir / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in saved.items() if isinstance(v, dict) and "id" in v} if isinstance(saved, dict) else {}


def save_ids(run_dir: Path, trackers: list[Tracker]) -> None:
    """trackers.json: each tracker's run id, the last step it was given and where it lives, written whole."""
    ids = {**_saved(run_dir), **{t.name: {"id": t.run_id, "step": t.last_step, **t.where} for t in trackers}}
    tmp = run_dir / (IDS_FILE + ".tmp")
    tmp.write_text(json.dumps(ids, indent=2))
    os.replace(tmp, run_dir / IDS_FILE)


def open_trackers(settings: Any, run_dir: Path, cfg: Any, start_step: int | None,
                  say: Callable[[str], None]) -> list[Tracker]:
    """The trackers `settings.backends` names beyond TensorBoard, opened. A resume (`start_step`: the step it
    resumes at) continues the run folder's tracker runs, unless it resumes from before the last step one was given
    (an earlier checkpoint): a tracker cannot take those steps back, so a new run starts and a note says so. One
    that fails is one line through `say`, or a UserError with logger.strict."""
    names = [choice(b) for b in settings.backends if choice(b) != "tensorboard"]
    if not names:
        return []
    saved = _saved(run_dir) if start_step is not None else {}
    config, group, tags = OmegaConf.to_container(cfg, resolve=True), sweep_group(run_dir), run_tags(cfg)
    opened: list[Tracker] = []
    for name in names:
        entry = saved.get(name)
        if entry is not None and int(entry.get("step", -1)) > start_step:  # type: ignore[operator]
            say(f"note: this run resumes at step {start_step:,}, before step {int(entry['step']):,} that its {name} "
                f"run {entry['id']} reached: a new {name} run continues it, so no step is logged twice")
            entry = {k: v for k, v in entry.items() if k not in ("id", "step")}  # the same store
        try:
            opened.append(TRACKERS[name](settings[name], run_dir, config, entry, group, tags))
        except ImportError:
            _failed(bool(settings.strict), say, f"logger.backends: {name} is not installed ({EXTRAS[name]})")
        except Exception as exc:  # noqa: BLE001 - a tracker's client can fail in any way (network, store, auth)
            first = first_line(exc)
            _failed(bool(settings.strict), say,
                    f"logger.backends: {name} could not start a run ({type(exc).__name__}: {first})")
    if opened:
        save_ids(run_dir, opened)
    return opened


def add_result(settings: Any, run_dir: Path, say: Callable[[str], None]) -> None:
    """result.json, written once the run has ended, as an artifact of the run's MLflow run (W&B has its figures as
    scalars already; reopening its run for a file would start another offline run). A failure here is a warning
    line whatever logger.strict says: the run is over and its result written."""
    entry, result = _saved(run_dir).get("mlflow"), run_dir / "result.json"
    if "mlflow" not in [choice(b) for b in settings.backends] or entry is None or not result.is_file():
        return
    try:
        import mlflow

        mlflow.MlflowClient(entry.get("uri") or absolute_uri(settings.mlflow.tracking_uri)).log_artifact(
            entry["id"], str(result))
    except Exception as exc:  # noqa: BLE001 - as in open_trackers
        first = first_line(exc)
        say(f"warning: logger.backends: mlflow could not store result.json ({type(exc).__name__}: {first})")


def _failed(strict: bool, say: Callable[[str], None], line: str) -> None:
    if strict:
        raise UserError(f"{line} (logger.strict=true)")
    say(f"warning: {line}; training goes on without it (logger.strict=true stops instead)")


def call(trackers: list[Tracker], what: Callable[[Tracker], None], strict: bool,
         say: Callable[[str], None]) -> list[Tracker]:
    """`what(tracker)` for each tracker; one that fails is dropped with one line (or stops the run, `strict`)."""
    alive = []
    for tracker in trackers:
        try:
            what(tracker)
            alive.append(tracker)
        except Exception as exc:  # noqa: BLE001 - as in open_trackers
            first = first_line(exc)
            _failed(strict, say, f"logger.backends: {tracker.name} failed ({type(exc).__name__}: {first})")
    return alive
