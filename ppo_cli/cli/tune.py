"""hydra/sweeper=ppo_tune: Bayesian, random, CMA-ES and grid search on Optuna, with pruning, any Hydra launcher.

The sweeper asks the study (Optuna's ask-and-tell) for a batch of `n_jobs` trials, launches one job per trial
and seed through whichever launcher is configured, and tells the study how each ended (the job's result.json:
its objective, or pruned, or failed). The jobs report their periodic evaluations to their trial themselves,
through the study's storage (run/trial.py), so the pruner sees them while they train and a pruned job stops at
once; the storage (an SQLite file in the sweep folder unless hydra.sweeper.storage says otherwise) is also what
lets a sweep be continued and several sweepers, on one machine or many, share a study.

Job folders are numbered trial x tune.seeds + seed index, so folders never collide, whichever sweeper ran the
trial; a trial interrupted by Ctrl-C is recorded as failed (user attribute `interrupted`) and queued again, so
a continued sweep ends with n_trials trials that ran to their end.
"""

from __future__ import annotations

import difflib
import fcntl
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from omegaconf import DictConfig, OmegaConf

from ppo_cli.cli.run_folder import TUNE_MARKER
from ppo_cli.errors import UserError, first_line
from ppo_cli.run.trial import JOURNAL, PRUNER_ATTR, PRUNERS, make_pruner, open_storage

SAMPLERS = ("tpe", "random", "cmaes", "grid")
RESULTS = "optimization_results.yaml"  # the best trial, and where the study is (ppo-sweep-report reads it)
SEEDS_ATTR = "ppo_cli.seeds"  # the study's tune.seeds: its job folders are numbered by it


@dataclass
class Space:
    """The search space: Optuna distributions by key, the overrides every job gets, and the values of each key
    for the grid sampler (None where a key has no finite list)."""

    distributions: dict[str, Any] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)
    grid: dict[str, list[Any] | None] = field(default_factory=dict)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _distribution(key: str, override: Override) -> tuple[Any, list[Any] | None]:
    """Hydra's sweep syntax as an Optuna distribution: choice(...) and a, b, c are categorical; range(a, b[,
    step]) is integers (or floats) from a to b, both included, as the Optuna sweeper read it; interval(a, b) is
    uniform over the reals (Hydra reads its ends as floats), tag(log, interval(a, b)) log-uniform."""
    import optuna.distributions as d

    sweep = override.value()
    if isinstance(sweep, ChoiceSweep):
        values = list(override.sweep_iterator(transformer=lambda x: x))
        return d.CategoricalDistribution(values), values
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step
        if all(isinstance(x, int) for x in (start, stop, step)):
            return d.IntDistribution(int(start), int(stop), step=int(step)), list(range(start, stop + 1, step))
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        return d.FloatDistribution(start, stop, step=step), [start + i * step for i in range(count)]
    if isinstance(sweep, IntervalSweep):
        return d.FloatDistribution(float(sweep.start), float(sweep.end), log="log" in sweep.tags), None
    raise UserError(f"{key}: {override.input_line!r} is not a search space ppo_tune reads: use choice(a, b), a,b, "
                    f"range(a, b), interval(a, b) or tag(log, interval(a, b))")


def flat_params(params: Any, prefix: str = "") -> dict[str, str]:
    """hydra.sweeper.params as KEY: SPACE: dotted keys as the presets write them, or nested, as an override like
    +hydra.sweeper.params.algo.gae_lambda=... makes them."""
    out: dict[str, str] = {}
    for key, value in (params or {}).items():
        if isinstance(value, (dict, DictConfig)):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def split_arguments(params: Any, arguments: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """The swept keys' override lines (hydra.sweeper.params, with the command line's sweeps winning) and the
    command line's fixed overrides (a key given one value leaves the sweep)."""
    lines = {k: f"{k}={v}" for k, v in flat_params(params).items()}
    fixed = []
    parser = OverridesParser.create()
    for arg in arguments:
        (override,) = parser.parse_overrides([arg])
        key = override.get_key_element()
        if override.is_sweep_override():
            lines[key] = arg
        else:
            lines.pop(key, None)
            fixed.append(arg)
    return lines, fixed


def search_space(params: dict[str, Any], arguments: Sequence[str], config: DictConfig) -> Space:
    """The space from hydra.sweeper.params and the command line's sweep overrides (which win), each key checked
    against the config before any job starts."""
    lines, fixed = split_arguments(params, arguments)
    space = Space(fixed=fixed)
    parser = OverridesParser.create()
    for key, line in lines.items():
        try:
            (override,) = parser.parse_overrides([line])
        except Exception as exc:  # noqa: BLE001 - Hydra's parser says what it could not read
            raise UserError(f"hydra.sweeper.params.{key}: cannot read {line.split('=', 1)[1]!r} "
                            f"({str(exc).strip().splitlines()[0]})") from None
        name = override.key_or_group
        if not override.is_add() and OmegaConf.select(config, name, default=_MISSING) is _MISSING:
            raise UserError(f"the search space names {name!r}, which is not a config key (a typo? "
                            f"docs/configuration.md lists the keys)")
        if not override.is_sweep_override():
            space.fixed.append(line)
            continue
        try:
            space.distributions[key], space.grid[key] = _distribution(key, override)
        except ValueError as exc:  # Optuna's: a log scale from 0, bounds the wrong way round, an empty range
            raise UserError(f"the search space of {key} ({line.split('=', 1)[1]}) is not one Optuna can sample: "
                            f"{first_line(exc)}") from None
    if not space.distributions:
        raise UserError("the search space is empty: give hydra.sweeper.params.KEY=interval(a, b) (or choice, "
                        "range), or sweep a key on the command line, e.g. 'algo.clip_range=interval(0.05, 0.3)'")
    return space


_MISSING = object()


def make_sampler(name: str, seed: int | None, startup_trials: int, space: Space, quiet: bool = False) -> Any:
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup_trials,
                                          constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        open_keys = [k for k, values in space.grid.items() if values is None]
        if open_keys:
            raise UserError(f"hydra.sweeper.sampler=grid needs a finite list for every key: {', '.join(open_keys)} "
                            f"is an interval (give choice(...) or range(a, b, step))")

        class Grid(optuna.samplers.GridSampler):
            """Optuna's grid sampler, which stops an optimize() loop once the grid is done (Study.stop, an error
            outside one); here n_trials is cut to the grid's size instead."""

            def after_trial(self, *args: Any, **kwargs: Any) -> None:
                pass

        return Grid(space.grid, seed=seed)  # type: ignore[arg-type]
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401 - Optuna's CMA-ES sampler needs it
        except ImportError:
            raise UserError('hydra.sweeper.sampler=cmaes needs the cmaes package: pip install ".[sweep]"') from None
        categorical = [k for k, dist in space.distributions.items()
                       if isinstance(dist, optuna.distributions.CategoricalDistribution)]
        if categorical and not quiet:
            print(f"ppo_tune: CMA-ES searches the numeric keys; {', '.join(categorical)} (categorical) are sampled at "
                  f"random", flush=True)
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup_trials, warn_independent_sampling=False,
                                            independent_sampler=optuna.samplers.RandomSampler(seed=seed))
    raise UserError(f"hydra.sweeper.sampler={name!r} is not a sampler; choose one of {', '.join(SAMPLERS)}")


def _quoted(value: str) -> str:
    """A value for a Hydra override, quoted: a URL's '?', '=' or '~' would not parse bare."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def normal_url(url: str) -> str:
    """journal:PATH with PATH absolute (~ expanded), so every job, sweeper and lock names the same file."""
    if url.startswith(JOURNAL):
        return JOURNAL + str(Path(url[len(JOURNAL):]).expanduser().resolve())
    return url


def default_storage(sweep_dir: Path) -> str:
    return f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


@contextmanager
def storage_lock(url: str) -> Iterator[None]:
    """One sweeper at a time counts the study's trials and asks for new ones, where the storage is a file on this
    machine (SQLite, journal): two sweepers never both take the last trial. Servers (PostgreSQL, MySQL) have no
    such lock; a trial asked beyond n_trials there is told failed at once, marked `surplus`, and not counted."""
    path = url[len(JOURNAL):] if url.startswith(JOURNAL) else url[len("sqlite:///"):] if url.startswith(
        "sqlite:///") else None
    if path is None:
        yield
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Not PATH.lock: Optuna's journal backend takes that name for a lock of its own (held while the file exists).
        handle = open(f"{path}.sweepers.lock", "a")  # noqa: SIM115 - held for the block below
    except OSError as exc:
        raise UserError(f"the study storage {url!r} cannot be opened ({exc.strerror or exc})") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def counted(trial: Any) -> bool:
    """Whether a trial counts toward n_trials: not one waiting to run, nor one interrupted (it runs again), nor a
    surplus one, nor one whose jobs could not be composed."""
    from optuna.trial import TrialState

    return trial.state != TrialState.WAITING and not any(trial.user_attrs.get(k) for k in ("interrupted", "surplus",
                                                                                          "not_run"))


def job_result(folder: Path, owner: str | None = None) -> dict[str, Any]:
    """A job's result.json; with `owner` (an override such as tune.trial=7), only if that job wrote it: a folder
    that held another run already is refused by the job, which then writes nothing there."""
    try:
        result = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return {"status": "missing", "error": "the job wrote no result.json"}
    if owner is not None and owner not in result.get("overrides", []):
        return {"status": "foreign", "error": f"{folder} holds another run's result (the job could not take it)"}
    return result


def setting(settings: dict[str, Any], key: str, default: Any, kind: type = int, low: float | None = None) -> Any:
    """hydra.sweeper.KEY as `kind`, `default` where it is null (0 stays 0), one line where it is not one."""
    value = settings.get(key)
    if value is None:
        return default
    try:
        value = kind(value)
    except (TypeError, ValueError):
        raise UserError(f"hydra.sweeper.{key}={value!r}: must be {'an integer' if kind is int else 'a number'}") \
            from None
    if low is not None and value < low:
        raise UserError(f"hydra.sweeper.{key}={value}: must be >= {low}")
    return value


TUNE_SETTINGS = ("n_trials", "n_jobs", "sampler", "seed", "startup_trials", "pruner", "pruner_startup_trials",
                 "pruner_warmup_steps", "pruner_min_resource", "direction", "study_name", "storage", "params")


def check_settings(settings: dict[str, Any], known: Sequence[str], sweeper: str) -> None:
    """A hydra.sweeper key the sweeper does not read is a typo to say, not a setting to ignore."""
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; it reads {', '.join(known)}"
            raise UserError(f"hydra.sweeper.{key} is not a {sweeper} setting{hint}")


def command_line(fixed: Sequence[str], params: dict[str, Any]) -> str:
    """The command that trains a trial's configuration on its own."""
    shown = [*(f for f in fixed if not f.startswith("tune.")), *(f"{k}={v}" for k, v in params.items())]
    return "ppo-train " + " ".join(shown)


class Tuner:
    """The ppo_tune sweep (what hydra_plugins.ppo_cli_sweepers.PPOTuneSweeper runs)."""

    def __init__(self, settings: dict[str, Any], config: DictConfig, launcher: Any) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        check_settings(settings, TUNE_SETTINGS, "ppo_tune")
        self.s, self.config, self.launcher = settings, config, launcher
        self.sweep_dir = Path(config.hydra.sweep.dir)
        sampler, pruner = str(settings.get("sampler") or "tpe"), str(settings.get("pruner") or "none")
        if pruner not in PRUNERS:
            raise UserError(f"hydra.sweeper.pruner={pruner!r} is not a pruner; choose one of {', '.join(PRUNERS)}")
        if sampler not in SAMPLERS:
            raise UserError(f"hydra.sweeper.sampler={sampler!r} is not a sampler; choose one of {', '.join(SAMPLERS)}")
        self.sampler_name, self.pruner_name = sampler, pruner
        self.n_trials = setting(settings, "n_trials", 20, low=1)
        self.n_jobs = setting(settings, "n_jobs", 1, low=1)
        self.seed = setting(settings, "seed", None)
        self.startup = setting(settings, "startup_trials", 5, low=0)
        self.seeds = int(config.tune.seeds)
        self.url = normal_url(str(settings.get("storage") or default_storage(self.sweep_dir)))
        self.study_name = str(settings.get("study_name") or "ppo")
        self.direction = str(settings.get("direction") or "maximize")
        if self.direction not in ("maximize", "minimize"):
            raise UserError(f"hydra.sweeper.direction={self.direction!r}: maximize or minimize")
        self.validate: Any = None  # the sweeper's check that a batch of jobs composes (Hydra's validate_batch_is_legal)
        if pruner != "none" and not config.eval.every_steps:
            print(f"ppo_tune: pruner {pruner} has nothing to judge: eval.every_steps=0 turns off the periodic "
                  f"evaluations jobs report (set eval.every_steps)", flush=True)

    def study(self, space: Space) -> Any:
        import optuna

        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        spec = {"name": self.pruner_name, "startup_trials": setting(self.s, "pruner_startup_trials", 5, low=0),
                "warmup_steps": setting(self.s, "pruner_warmup_steps", 0, low=0),
                "min_resource": setting(self.s, "pruner_min_resource", None, low=1)}
        with storage_lock(self.url):  # sweepers that start together must not both create the file's tables
            study = optuna.create_study(study_name=self.study_name, storage=open_storage(self.url),
                                        sampler=self.sampler(space, 0), pruner=make_pruner(spec),
                                        direction=self.direction, load_if_exists=True)
            if study.direction.name.lower() != self.direction:
                raise UserError(f"study {self.study_name!r} in {self.url} was created to {study.direction.name.lower()}"
                                f"; hydra.sweeper.direction={self.direction} cannot change that")
            seeds = study.user_attrs.get(SEEDS_ATTR, self.seeds)
            if seeds != self.seeds:  # job folders are numbered trial x seeds + seed: another count would reuse them
                raise UserError(f"study {self.study_name!r} in {self.url} was run with tune.seeds={seeds}; continue it "
                                f"with tune.seeds={seeds}, or start another study (hydra.sweeper.study_name)")
            study.set_user_attr(PRUNER_ATTR, spec)
            study.set_user_attr(SEEDS_ATTR, self.seeds)
        self.check_space(study, space)
        (self.sweep_dir / TUNE_MARKER).write_text(OmegaConf.to_yaml({"storage": self.url, "study": self.study_name}))
        if self.sampler_name == "grid":
            size = math.prod(len(v or []) for v in space.grid.values())
            self.n_trials = min(self.n_trials, size)
        return study

    def check_space(self, study: Any, space: Space) -> None:
        """A continued study keeps each key's kind of range (Optuna cannot sample one key from two kinds)."""
        from optuna.distributions import check_distribution_compatibility

        for trial in study.get_trials(deepcopy=False):
            for key, before in trial.distributions.items():
                if key in space.distributions:
                    try:
                        check_distribution_compatibility(before, space.distributions[key])
                    except ValueError:
                        raise UserError(f"study {self.study_name!r} in {self.url} sampled {key} from "
                                        f"{type(before).__name__}, this sweep from "
                                        f"{type(space.distributions[key]).__name__}: continue it with the same kind "
                                        f"of range, or start another study (hydra.sweeper.study_name)") from None

    def sampler(self, space: Space, count: int) -> Any:
        """The sampler for the study's trial number `count`: seeded with seed + count, so a continued study, or a
        second sweeper on it, draws anew where a sampler seeded once would repeat the same random trials (the
        model-based samplers read the study's history from the storage, so a fresh one per trial loses nothing). The
        grid sampler keeps one: the study records which grid points are taken."""
        seed = None if self.seed is None else self.seed + count
        return make_sampler(self.sampler_name, seed, self.startup, space, quiet=count > 0)

    def sweep(self, arguments: list[str]) -> list[Any]:
        space = search_space(self.s.get("params") or {}, arguments, self.config)
        study = self.study(space)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        done = [t for t in study.get_trials(deepcopy=False) if counted(t)]
        print(f"ppo_tune: study {self.study_name!r} in {self.url}: {len(done)} of {self.n_trials} trials done; "
              f"sampler {self.sampler_name}, pruner {self.pruner_name}, {self.n_jobs} at a time"
              + (f", {self.seeds} seeds each" if self.seeds > 1 else ""), flush=True)
        returns = []
        while True:
            batch = self.ask(study, space)
            if not batch:
                break
            returns.append(self.run(study, space, batch))
        self.write_results(study, space)
        return returns

    def ask(self, study: Any, space: Space) -> list[Any]:
        batch = []
        with storage_lock(self.url):
            trials = study.get_trials(deepcopy=False)
            for i in range(min(self.n_jobs, self.n_trials - sum(counted(t) for t in trials))):
                if self.sampler_name != "grid":
                    study.sampler = self.sampler(space, len(trials) + i)
                batch.append(study.ask(space.distributions))
        if batch:  # past n_trials in the order the storage numbered them: another sweeper took the last ones
            order = sorted(t.number for t in study.get_trials(deepcopy=False) if counted(t))
            for trial in [t for t in batch if order.index(t.number) >= self.n_trials]:
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=_state("FAIL"))
                batch.remove(trial)
        return batch

    def run(self, study: Any, space: Space, batch: list[Any]) -> Any:
        base_seed = int(self.config.seed)
        jobs, names = [], []
        for trial in batch:
            for s in range(self.seeds):
                name = str(trial.number * self.seeds + s)
                seed = [f"seed={base_seed + s}"] if self.seeds > 1 else []
                jobs.append([*space.fixed, *(f"{k}={v}" for k, v in trial.params.items()), *seed,
                             f"tune.storage={_quoted(self.url)}", f"tune.study={_quoted(self.study_name)}",
                             f"tune.trial={trial.number}", f"hydra.sweep.subdir={name}"])
                names.append(name)
        per_trial = [names[i * self.seeds:(i + 1) * self.seeds] for i in range(len(batch))]
        try:
            if self.validate is not None:
                try:  # a job that cannot compose (a float for an integer key): one line, no job run
                    self.validate(jobs)
                except Exception:
                    for trial in batch:  # never ran: they do not use up n_trials
                        trial.set_user_attr("not_run", True)
                    raise
            returns = self.launcher.launch(jobs, initial_job_idx=int(names[0]))
            for trial, trial_names in zip(batch, per_trial, strict=True):
                self.tell(study, trial, trial_names)
        except BaseException as exc:
            self.abandon(study, batch, per_trial, exc)
            raise
        return returns

    def abandon(self, study: Any, batch: list[Any], per_trial: list[list[str]], exc: BaseException) -> None:
        """A batch cut short. Trials whose jobs all ended are told how; on Ctrl-C (or SIGTERM) the others are
        recorded as interrupted and queued to run first when the sweep is continued; on any other error they
        fail with it (queued again, the same error would come back at every continuation)."""
        stopped = isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and exc.code in (130, 143))
        running = {t.number for t in study.get_trials(deepcopy=False, states=(_state("RUNNING"),))}
        for trial, trial_names in zip(batch, per_trial, strict=True):
            if trial.number not in running:
                continue
            results = [job_result(self.sweep_dir / n, f"tune.trial={trial.number}") for n in trial_names]
            statuses = [r.get("status") for r in results]
            if all(s in ("ok", "pruned", "failed", "missing") for s in statuses) and statuses.count("missing") < \
                    len(statuses):  # its jobs ran and ended (one with no result counts as failed)
                self.tell(study, trial, trial_names)
            elif stopped:
                trial.set_user_attr("interrupted", True)
                study.tell(trial, state=_state("FAIL"))
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            else:
                trial.set_user_attr("error", first_line(exc))
                study.tell(trial, state=_state("FAIL"))

    def tell(self, study: Any, trial: Any, names: list[str]) -> None:
        results = [job_result(self.sweep_dir / n, f"tune.trial={trial.number}") for n in names]
        statuses = [r.get("status") for r in results]
        values = [r["objective"] for r in results if r.get("status") == "ok" and r.get("objective") is not None]
        if "pruned" in statuses:
            study.tell(trial, state=_state("PRUNED"))
            step = next((r.get("stopped_at_step") for r in results if r.get("status") == "pruned"), None)
            what = f"pruned{f' at step {step:,}' if step else ''}"
        elif values and len(values) == len(results):
            study.tell(trial, sum(values) / len(values))
            what = f"objective {sum(values) / len(values):.2f}" + (f" (mean of {len(values)} seeds)"
                                                                    if len(values) > 1 else "")
        else:
            error = next((r.get("error") for r in results if r.get("status") not in ("ok", "pruned")), "no objective")
            trial.set_user_attr("error", str(error))
            study.tell(trial, state=_state("FAIL"))
            what = f"failed: {error}"
        print(f"ppo_tune: trial {trial.number} (job{'s' if len(names) > 1 else ''} {', '.join(names)}): {what}",
              flush=True)

    def write_results(self, study: Any, space: Space) -> None:
        from optuna.trial import TrialState

        trials = [t for t in study.get_trials(deepcopy=False) if counted(t)]
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        summary: dict[str, Any] = {"name": self.study_name, "storage": self.url, "sampler": self.sampler_name,
                                   "pruner": self.pruner_name, "n_trials": len(trials),
                                   "complete": len(complete),
                                   "pruned": sum(t.state == TrialState.PRUNED for t in trials),
                                   "failed": sum(t.state == TrialState.FAIL for t in trials),
                                   "fixed": list(space.fixed)}
        if complete:
            best = study.best_trial
            summary.update(best_trial=best.number, best_value=best.value, best_params=dict(best.params),
                           best_command=command_line(space.fixed, best.params))
            print(f"ppo_tune: best trial {best.number}: objective {best.value:.2f}; train it alone with:\n  "
                  f"{summary['best_command']}", flush=True)
        (self.sweep_dir / RESULTS).write_text(OmegaConf.to_yaml(OmegaConf.create(summary)))
        print(f"ppo_tune: {summary['n_trials']} trials ({summary['complete']} complete, {summary['pruned']} pruned, "
              f"{summary['failed']} failed); study in {self.url}; optuna-dashboard {self.url}", flush=True)


def _state(name: str) -> Any:
    from optuna.trial import TrialState

    return getattr(TrialState, name)
