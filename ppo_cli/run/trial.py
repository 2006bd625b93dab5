"""A sweep job's side of its Optuna trial (hydra/sweeper=ppo_tune): each periodic evaluation is reported
to the trial through the study's storage, and the study's pruner says whether to stop.

The job talks to the storage itself, not through the sweeper, so it works under any Hydra launcher (in the
sweeper's process, joblib's workers, Slurm nodes) and on any machine that reaches the storage. With
`tune.seeds` > 1 the trial's jobs (one per seed) each report their own evaluations (user attributes), and the
trial's intermediate value at a step is the mean over the seeds that reached it, which is what the pruner
compares: a configuration is scored by its seeds' mean, pruned or not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ppo_cli.errors import UserError, first_line

JOURNAL = "journal:"  # hydra.sweeper.storage=journal:PATH: Optuna's journal file, for a filesystem many machines share


def open_storage(url: str) -> Any:
    """The study storage that `url` names: an RDB URL (sqlite:///, postgresql://, mysql://) or journal:PATH. One
    clear line where it cannot be opened."""
    import optuna

    try:
        if url.startswith(JOURNAL):
            path = Path(url[len(JOURNAL):]).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(path))
            return optuna.storages.JournalStorage(backend)
        # SQLite: many processes write one file; wait for a lock instead of failing at once ("database is locked").
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as exc:  # noqa: BLE001 - a driver, a URL or a file can fail in many ways
        raise UserError(f"the study storage {url!r} cannot be opened ({first_line(exc)}); give an RDB URL "
                        f"(sqlite:///PATH, postgresql://..., mysql://...) or journal:PATH") from None


PRUNERS = ("median", "sha", "hyperband", "none")
PRUNER_ATTR = "ppo_cli.pruner"  # the study's user attribute that tells its jobs which pruner the sweeper chose


def make_pruner(spec: dict[str, Any]) -> Any:
    """The Optuna pruner of a spec ({"name": median | sha | hyperband | none, "startup_trials", "warmup_steps",
    "min_resource"}), steps being env steps: the sweeper stores it in the study, and every job builds the same."""
    import optuna

    name = spec.get("name", "median")
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(spec.get("startup_trials", 5)),
                                           n_warmup_steps=int(spec.get("warmup_steps", 0)))
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.get("min_resource") or "auto")
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.get("min_resource") or 1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"hydra.sweeper.pruner={name!r} is not a pruner; choose one of {', '.join(PRUNERS)}")


def seed_key(seed: int, step: int) -> str:
    return f"eval:seed={seed}:step={step}"


class TrialReporter:
    """Reports a job's evaluations to its trial; `report(step, value)` is True when the trial is to stop (pruned)."""

    def __init__(self, tune: DictConfig, seed: int) -> None:
        import optuna

        self.storage = open_storage(str(tune.storage))
        study = optuna.load_study(study_name=str(tune.study), storage=self.storage)
        self.pruner = make_pruner(study.user_attrs.get(PRUNER_ATTR) or {"name": "none"})
        self.study = optuna.load_study(study_name=str(tune.study), storage=self.storage, pruner=self.pruner)
        self.trial_id = next(t._trial_id for t in self.study.get_trials(deepcopy=False) if t.number == tune.trial)
        self.seed = seed
        self.pruned_at: int | None = None

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> TrialReporter | None:
        tune = cfg.get("tune")
        if tune is None or tune.storage is None or tune.trial is None:
            return None
        try:
            return cls(tune, int(cfg.seed))
        except StopIteration:
            raise UserError(f"tune.trial={tune.trial}: no such trial in study {tune.study!r} of "
                            f"{tune.storage}") from None
        except KeyError:
            raise UserError(f"tune.study={tune.study!r}: no such study in {tune.storage}") from None

    def report(self, step: int, value: float) -> bool:
        """`step`: the evaluation's nominal step (a multiple of eval.every_steps), the same in every trial whatever its
        rollout size, as the pruners compare trials step by step. A trial already finished (a sweep job's checkpoint
        resumed on its own, after the sweep) is told nothing."""
        storage, trial = self.storage, self.storage.get_trial(self.trial_id)
        if trial.state.is_finished():
            return False
        if trial.user_attrs.get("pruned_at") is not None:  # another seed of this trial was pruned: all stop
            self.pruned_at = step
            return True
        storage.set_trial_user_attr(self.trial_id, seed_key(self.seed, step), float(value))
        trial = storage.get_trial(self.trial_id)
        values = [v for k, v in trial.user_attrs.items() if k.startswith("eval:") and k.endswith(f":step={step}")]
        storage.set_trial_intermediate_value(self.trial_id, step, sum(values) / len(values))
        if self.pruner.prune(self.study, storage.get_trial(self.trial_id)):
            storage.set_trial_user_attr(self.trial_id, "pruned_at", step)
            self.pruned_at = step
            return True
        return False
