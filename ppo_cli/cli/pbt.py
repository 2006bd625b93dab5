"""hydra/sweeper=ppo_pbt: population-based training (Jaderberg et al., 2017) through any Hydra launcher.

A population of `population` members trains in generations of `interval` env steps, each generation one job per
member (folder generation x population + member). After each generation the members are ranked by their job's
objective (eval.objective, the final evaluation by default); the worst `quantile` (and any that failed) each
copy the checkpoint of a member of the best `quantile` (exploit) and perturb its values of the `params` keys
(explore: each multiplied by one of `perturb`, or with `resample_probability` drawn afresh from its initial
distribution, within its bounds). Every job of a later generation resumes from a checkpoint (its own member's or
the one it copied) with its new values on the command line, which `ppo-train resume=` takes over the
checkpoint's. pbt_lineage.json, rewritten after each generation, says who copied whom, with which values, at
which step, and for each member the chain of commands that trains its final policy again on its own.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from ppo_cli.cli.study_report import LINEAGE
from ppo_cli.cli.tune import _distribution, check_settings, job_result, setting, split_arguments
from ppo_cli.config import GROUPS, choice
from ppo_cli.errors import UserError

_MISSING = object()
PBT_SETTINGS = ("population", "interval", "quantile", "perturb", "resample_probability", "seed", "params")


def _bounds(dist: Any) -> tuple[float, float, bool, bool]:
    """(low, high, log, integer) of a numeric distribution; categorical choices of numbers span their range."""
    import optuna.distributions as d

    if isinstance(dist, d.CategoricalDistribution):
        return min(dist.choices), max(dist.choices), False, all(isinstance(c, int) for c in dist.choices)
    return dist.low, dist.high, bool(getattr(dist, "log", False)), isinstance(dist, d.IntDistribution)


def _single_keys(overrides: list[str]) -> list[str]:
    """The overrides without config-group choices (env=..., algo=...), which a resume refuses: its checkpoint's
    config holds what they chose."""
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in GROUPS]


class PopulationTraining:
    """The ppo_pbt sweep (what hydra_plugins.ppo_cli_sweepers.PPOPBTSweeper runs)."""

    def __init__(self, settings: dict[str, Any], config: DictConfig, launcher: Any) -> None:
        check_settings(settings, PBT_SETTINGS, "ppo_pbt")
        self.s, self.config, self.launcher = settings, config, launcher
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.population = setting(settings, "population", 8)
        self.interval = setting(settings, "interval", 0)
        self.quantile = setting(settings, "quantile", 0.25, float)
        self.perturb = [float(f) for f in settings.get("perturb") or (0.8, 1.25)]
        self.resample = setting(settings, "resample_probability", 0.0, float)
        self.rng = random.Random(setting(settings, "seed", None))
        total = int(config.algo.total_timesteps)
        rollout = int(config.algo.n_steps) * int(config.env.num_envs)
        problems = []
        if self.interval > 0 and self.interval % rollout:
            # Training runs in whole rollouts: a generation must end where one does, or each overshoots the next's
            # start and the next has nothing to train.
            near = max(rollout, round(self.interval / rollout) * rollout)
            problems.append(f"hydra.sweeper.interval={self.interval}: must be a multiple of the rollout, algo.n_steps "
                            f"x env.num_envs = {rollout:,} (say {near:,})")
        if self.population < 2:
            problems.append(f"hydra.sweeper.population={self.population}: needs at least 2 members")
        if not 0 < self.interval <= total:
            problems.append(f"hydra.sweeper.interval={self.interval}: must be between 1 and algo.total_timesteps="
                            f"{total:,} (env steps per generation)")
        if not 0 < self.quantile <= 0.5:
            problems.append(f"hydra.sweeper.quantile={self.quantile}: must be in (0, 0.5]")
        for key in ("lr_schedule", "ent_schedule"):
            if choice(OmegaConf.select(config, f"algo.{key}")) != "constant":
                problems.append(f"algo.{key} must be constant under PBT (a linear schedule would restart its "
                                f"annealing in every generation; PBT's explore steps are the schedule)")
        if problems:
            raise UserError("; ".join(problems))
        self.generations = math.ceil(total / self.interval)
        self.total = total

    def space(self, arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
        """The mutable keys' initial distributions (every one a number), and the overrides every job gets."""
        params, fixed = split_arguments(self.s.get("params"), arguments)
        parser = OverridesParser.create()
        if any(a.split("=", 1)[0] == "resume" for a in fixed):
            raise UserError("ppo_pbt resumes each member from the checkpoints it chooses: resume= is not for a PBT "
                            "sweep")
        # The budget and the base seed are read from the config; each job gets its own (see sweep).
        fixed = [a for a in fixed if a.split("=", 1)[0].lstrip("+") not in ("seed", "algo.total_timesteps")]
        space = {}
        for key, line in params.items():
            (override,) = parser.parse_overrides([line])
            current = OmegaConf.select(self.config, key, default=_MISSING)
            if not override.is_sweep_override():
                raise UserError(f"hydra.sweeper.params.{key}={line.split('=', 1)[1]}: a PBT key needs a range to start "
                                f"from and explore in, e.g. interval(1e-4, 3e-3)")
            dist, _ = _distribution(key, override)
            numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool)
                          for c in getattr(dist, "choices", [0]))
            if current is _MISSING:
                raise UserError(f"hydra.sweeper.params.{key}: {key} is not a config key (a typo? "
                                f"docs/configuration.md lists the keys)")
            if not numeric or isinstance(current, (str, bool)):
                raise UserError(f"hydra.sweeper.params.{key}: PBT mutates numbers only, and {key} is "
                                f"{type(current).__name__}")
            space[key] = dist
        if not space:
            raise UserError("ppo_pbt has no mutable keys: give hydra.sweeper.params.KEY=interval(a, b)")
        return space, fixed

    def draw(self, dist: Any) -> float | int:
        low, high, log, integer = _bounds(dist)
        if hasattr(dist, "choices"):
            return self.rng.choice(list(dist.choices))
        value = math.exp(self.rng.uniform(math.log(low), math.log(high))) if log else self.rng.uniform(low, high)
        return int(round(value)) if integer else value

    def explore(self, values: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in values.items():
            low, high, _, integer = _bounds(space[key])
            if hasattr(space[key], "choices"):  # a choice stays one of its values: a neighbour, or any with resampling
                choices = sorted(space[key].choices)
                i = choices.index(value) + self.rng.choice((-1, 1))
                new = self.draw(space[key]) if self.rng.random() < self.resample else choices[min(max(i, 0),
                                                                                                   len(choices) - 1)]
                out[key] = new
                continue
            if self.rng.random() < self.resample:
                new = self.draw(space[key])
            else:
                new = min(max(value * self.rng.choice(self.perturb), low), high)
            out[key] = int(round(new)) if integer else float(new)
        return out

    def sweep(self, arguments: list[str]) -> list[Any]:
        space, fixed = self.space(arguments)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        n, seed = self.population, int(self.config.seed)
        values = [{k: self.draw(d) for k, d in space.items()} for _ in range(n)]
        sources: list[str | None] = [None] * n  # the checkpoint (job folder) each member's next job resumes from
        chains: list[list[dict[str, Any]]] = [[] for _ in range(n)]  # the jobs each member's policy went through
        lineage: dict[str, Any] = {"population": n, "interval": self.interval, "generations": self.generations,
                                   "quantile": self.quantile, "params": list(space), "fixed": fixed, "events": [],
                                   "members": []}
        print(f"ppo_pbt: {n} members, {self.generations} generations of {self.interval:,} steps; mutable: "
              f"{', '.join(space)}", flush=True)
        returns = []
        for g in range(self.generations):
            names = [str(g * n + k) for k in range(n)]
            until = min((g + 1) * self.interval, self.total)
            jobs = []
            for k in range(n):
                if sources[k] is None:
                    start = [*fixed, f"seed={seed + k}"]
                else:  # the checkpoint's config has the groups chosen (env=...): a resume takes single keys only
                    ckpt = self.sweep_dir.resolve() / str(sources[k]) / "checkpoints" / "checkpoint.pt"
                    start = [*_single_keys(fixed), f"resume={ckpt}"]
                jobs.append([*start, *(f"{key}={v}" for key, v in values[k].items()),
                             f"algo.total_timesteps={until}", f"hydra.sweep.subdir={names[k]}"])
            returns.append(self.launcher.launch(jobs, initial_job_idx=g * n))
            results = [job_result(self.sweep_dir / name) for name in names]
            scores = [r.get("objective") if r.get("status") == "ok" else None for r in results]
            before = [list(c) for c in chains]
            for k in range(n):
                chains[k] = [*(before[int(sources[k]) % n] if sources[k] is not None else []),  # type: ignore[arg-type]
                             {"generation": g, "job": names[k], "values": dict(values[k]), "until": until,
                              "objective": scores[k], "step": results[k].get("global_step")}]
            shown = ", ".join(f"{k}: {s:.1f}" if s is not None else f"{k}: failed" for k, s in enumerate(scores))
            print(f"ppo_pbt: generation {g} (to step {until:,}): {shown}", flush=True)
            if g + 1 < self.generations:
                sources, values = self.exploit(g, names, scores, results, values, space, lineage)
            lineage["members"] = [self.member(k, chains[k], seed, fixed) for k in range(n)]
            (self.sweep_dir / LINEAGE).write_text(json.dumps(lineage, indent=2) + "\n")
        best = max(lineage["members"], key=lambda m: m["objective"] if m["objective"] is not None else -math.inf)
        score = "failed" if best["objective"] is None else f"{best['objective']:.2f}"
        print(f"ppo_pbt: best member {best['member']}: objective {score} (job {best['job']}); its "
              f"schedule as one run:\n  {best['command']}\nlineage: {self.sweep_dir / LINEAGE}", flush=True)
        return returns

    def exploit(self, g: int, names: list[str], scores: list[float | None], results: list[dict[str, Any]],
                values: list[dict[str, Any]], space: dict[str, Any],
                lineage: dict[str, Any]) -> tuple[list[str | None], list[dict[str, Any]]]:
        n = self.population
        order = sorted(range(n), key=lambda k: -math.inf if scores[k] is None else scores[k])  # worst first
        cut = max(1, int(n * self.quantile))
        top = [k for k in order[-cut:] if scores[k] is not None]
        bottom = set(order[:cut]) | {k for k in range(n) if scores[k] is None}
        sources: list[str | None] = list(names)
        new_values = [dict(v) for v in values]
        for k in sorted(bottom - set(top)):
            if not top:
                break
            j = self.rng.choice(top)
            sources[k], new_values[k] = names[j], self.explore(values[j], space)
            lineage["events"].append({"kind": "exploit", "generation": g + 1, "step": results[j].get("global_step"),
                                      "member": k, "job": str((g + 1) * n + k), "replaced_job": names[k],
                                      "score": scores[k], "source": j,
                                      "source_job": names[j], "source_score": scores[j], "values": new_values[k]})
        return sources, new_values

    def member(self, k: int, chain: list[dict[str, Any]], seed: int, fixed: list[str]) -> dict[str, Any]:
        """A member's record, with the chain of commands that trains its current policy on its own."""
        folder = f"runs/pbt_member_{k}"
        first_seed = seed + int(chain[0]["job"]) % self.population if chain else seed + k
        steps = []
        for i, link in enumerate(chain):
            start = [*fixed, f"seed={first_seed}", f"hydra.run.dir={folder}"] if i == 0 else \
                [*_single_keys(fixed), f"resume={folder}/checkpoints/checkpoint.pt"]
            values = [f"{key}={v}" for key, v in link["values"].items()]
            steps.append(" ".join(["ppo-train", *start, *values, f"algo.total_timesteps={link['until']}"]))
        last = chain[-1] if chain else {}
        return {"member": k, "job": last.get("job"), "objective": last.get("objective"),
                "values": last.get("values"), "chain": [link["job"] for link in chain], "command": " && ".join(steps)}
