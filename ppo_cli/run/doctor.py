"""The training doctor: cheap checks on the statistics each update already computed, each saying once, in one
line, the symptom, the step, the likely cause and the knob to turn (docs/tensorboard.md#the-training-doctor).

A run that went wrong usually shows it in its curves long before anyone reads them: an entropy that collapsed in
the first few percent of training, a KL that jumps, a value function that explains nothing, every gradient step
clipped, returns that never move. `Doctor.update` reads one update's scalars (and the episodes it finished),
`Doctor.evaluation` one periodic evaluation; each returns the warnings that became true, which the runner prints,
writes to TensorBoard as text and keeps for result.json (`warnings`). A symptom is told once per run.

The thresholds are config keys (`doctor.*`, the DoctorConfig table in docs/configuration.md). The checks only read
numbers; a crafted stream of statistics triggers each one (tests/test_doctor.py).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from statistics import median
from typing import Any


@dataclass(frozen=True)
class Warning:  # noqa: A001 - the doctor's word for it; never raised, never mixed with the builtin
    symptom: str
    step: int
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"symptom": self.symptom, "step": self.step, "message": self.message}


class Doctor:
    """The checks, with the state they need (a few numbers per update). `settings`: the run config's `doctor`
    group; `algo`: its `algo` group (target_kl, max_grad_norm, total_timesteps); `discrete`: whether the action
    head is categorical (its entropy is compared as a fraction of the initial one) and `action_dims` the Gaussian's
    dimensions otherwise (its entropy is compared through the spread it implies); `normalize_reward` and
    `normalize_obs`: whether the rewards and observations are already scaled."""

    def __init__(self, settings: Any, algo: Any, discrete: bool, action_dims: int, normalize_reward: bool,
                 normalize_obs: bool = False) -> None:
        self.s, self.a, self.normalize_obs = settings, algo, normalize_obs
        self.discrete, self.action_dims, self.normalize_reward = discrete, max(int(action_dims), 1), normalize_reward
        self.told: set[str] = set()
        self.warnings: list[Warning] = []
        self.first_entropy: float | None = None
        self.streaks: dict[str, tuple[int, float]] = {}  # symptom -> (updates in a row, progress at the first)
        self.first_value_losses: list[float] = []
        self.first_returns: list[float] = []  # the training returns of the first updates that had episodes
        self.recent_returns: deque[float] = deque(maxlen=100)
        self.sps_seen, self.sps_peak = 0, 0.0
        self.recent_sps: deque[float] = deque(maxlen=max(settings.patience_long // 2, 1))
        self.train_return: float | None = None
        self.eval_gaps = 0
        self.updates = 0

    # --- checkpoints: a resumed run keeps what was told and the baselines -----------------------------------
    _STATE = ("first_entropy", "first_value_losses", "first_returns", "train_return", "eval_gaps", "updates",
              "sps_seen", "sps_peak")

    def state(self) -> dict[str, Any]:
        """Plain data for the checkpoint (checkpoint.STATE_KEYS' `doctor`)."""
        return {**{k: getattr(self, k) for k in self._STATE}, "told": sorted(self.told),
                "warnings": [w.as_dict() for w in self.warnings], "streaks": {k: list(v) for k, v in
                                                                           self.streaks.items()},
                "recent_returns": list(self.recent_returns), "recent_sps": list(self.recent_sps)}

    def load(self, state: dict[str, Any] | None) -> None:
        if not state:  # a checkpoint from before the doctor: it starts afresh
            return
        for k in self._STATE:
            setattr(self, k, state[k])
        self.told = set(state["told"])
        self.warnings = [Warning(**w) for w in state["warnings"]]
        self.streaks = {k: (int(v[0]), float(v[1])) for k, v in state["streaks"].items()}
        self.recent_returns.extend(state["recent_returns"])
        self.recent_sps.extend(state["recent_sps"])

    # --- what the runner calls --------------------------------------------------------------------------------
    def update(self, step: int, scalars: dict[str, float], returns: list[float], lengths: list[int]) -> list[Warning]:
        """The warnings this update's statistics (Runner's scalars: losses/*, charts/SPS) make true."""
        if not self.s.enabled:
            return []
        found: list[tuple[str, str]] = []
        progress = step / max(self.a.total_timesteps, 1)
        get = lambda name: scalars.get(f"losses/{name}", math.nan)  # noqa: E731
        found += self._entropy(get("entropy"), progress)
        kl = get("approx_kl")
        if self.a.target_kl is not None:
            # The updater stops an update's epochs once a minibatch passes 1.5 x target_kl, so the logged mean KL
            # stays below it: the symptom is that every update stops early.
            epochs = get("epochs")
            if self._lasts("kl_high", epochs < self.a.K_epochs, self.s.patience):
                found.append(("kl_high", f"the last {self.s.patience} updates each stopped early at 1.5 x "
                                         f"algo.target_kl={self.a.target_kl:g} (the last after {epochs:.0f} of "
                                         f"{self.a.K_epochs} epochs): each epoch moves the policy too far. Likely "
                                         f"a learning rate too high: lower algo.lr_actor"))
        elif self._lasts("kl_high", kl > self.s.kl_max, self.s.patience):
            found.append(("kl_high", f"approx_kl {kl:.3g} above {self.s.kl_max:g} for {self.s.patience} updates: "
                                     f"each update moves the policy too far. Likely a learning rate too high or too "
                                     f"many epochs: lower algo.lr_actor or algo.K_epochs, or set algo.target_kl to "
                                     f"stop epochs early"))
        clip = get("clip_fraction")
        if self._lasts("clip_fraction_high", clip > self.s.clip_fraction_max, self.s.patience):
            found.append(("clip_fraction_high", f"clip_fraction {clip:.2f} above {self.s.clip_fraction_max:g} for "
                                                f"{self.s.patience} updates: most samples hit the clip, so the update "
                                                f"is mostly clipped away. Likely a learning rate too high: lower "
                                                f"algo.lr_actor (or raise algo.clip_range)"))
        ev = get("explained_variance")
        if self._lasts("value_not_learning", ev < self.s.explained_variance_min, self.s.patience_long):
            found.append(("value_not_learning", f"explained variance {ev:.2f} below "
                                                f"{self.s.explained_variance_min:g} for {self.s.patience_long} "
                                                f"updates: the value function explains none of the returns, so the "
                                                f"advantages are noise. Likely algo.vf_coef or algo.lr_critic too "
                                                f"low, or unscaled rewards: raise them, or set "
                                                f"env.normalize_reward=true"))
        clipped = get("grad_clipped")
        # Early gradients are large in healthy runs too (CartPole's first dozen updates clip every step): "always"
        # is also a tenth of the run.
        if self._lasts("grad_always_clipped", clipped >= 1.0, self.s.patience_long, progress, 0.1):
            found.append(("grad_always_clipped", f"every minibatch step of the last {self.s.patience_long} updates had "
                                                 f"a gradient norm above algo.max_grad_norm={self.a.max_grad_norm:g} "
                                                 f"(last: {get('grad_norm'):.3g}): the clip, not the learning rate, "
                                                 f"sets every step. Likely unscaled rewards or a learning rate too "
                                                 f"high: env.normalize_reward=true, a lower learning rate, or a larger "
                                                 f"algo.max_grad_norm"))
        found += self._value_loss(get("value_loss"))
        scale = scalars.get("charts/input_scale", math.nan)
        if not self.normalize_obs and scale > self.s.input_scale_max:
            found.append(("obs_scale", f"the network's inputs average {scale:.3g} in absolute value and "
                                       f"env.normalize_obs is off: large inputs saturate tanh units and slow "
                                       f"learning. Set env.normalize_obs=true (or scale the env's observations)"))
        found += self._returns(progress, returns, lengths)
        sps = scalars.get("charts/SPS", math.nan)
        if math.isfinite(sps):
            found += self._sps(sps)
        return self._tell(step, found)

    def evaluation(self, step: int, eval_return: float) -> list[Warning]:
        """The warnings a periodic evaluation's mean return makes true, against the recent training returns."""
        if not self.s.enabled or self.train_return is None:
            return []
        train, gap = self.train_return, self.s.eval_gap
        below = train - eval_return > gap * max(abs(train), abs(eval_return), 1e-8)
        self.eval_gaps = self.eval_gaps + 1 if below else 0
        if self.eval_gaps < 2:
            return []
        return self._tell(step, [("eval_below_train",
                                  f"the evaluation's mean return {eval_return:.3g} is far below the training return "
                                  f"{train:.3g} for 2 evaluations in a row: the policy may fit what the training envs "
                                  f"do rather than the task, or its deterministic actions differ from the sampled "
                                  f"ones. Try eval.deterministic=false, more env.num_envs, or a larger algo.ent_coef")])

    # --- the checks that keep more than a streak -------------------------------------------------------------
    def _entropy(self, entropy: float, progress: float) -> list[tuple[str, str]]:
        if not math.isfinite(entropy):
            return []
        if self.first_entropy is None:
            self.first_entropy = entropy
            return []
        if progress > self.s.early and not (self.updates >= self.s.patience_long and self._not_improved()):
            return []  # late, after the returns improved: convergence rather than a collapse
        # The spread left, as a fraction of the first update's: entropy itself for a categorical head; for a
        # Gaussian, whose entropy per dimension is log(std) + a constant, the factor the std shrank by.
        if self.discrete:
            left = entropy / self.first_entropy if self.first_entropy > 0 else 1.0
        else:
            left = math.exp(-(self.first_entropy - entropy) / self.action_dims)
        if left >= self.s.entropy_collapse:
            return []
        when = (f"in the first {100 * progress:.0f}% of training" if progress <= self.s.early else
                "with the training return no better than in the first updates")
        return [("entropy_collapse", f"the policy's entropy fell to {entropy:.3g} from {self.first_entropy:.3g} "
                                     f"(its spread to {100 * left:.0f}%) {when}: it stopped exploring before it "
                                     f"found what pays. Likely algo.ent_coef too low or a learning rate too high: "
                                     f"raise algo.ent_coef or lower algo.lr_actor")]

    def _value_loss(self, loss: float) -> list[tuple[str, str]]:
        # Against its level in the first updates, not its lowest: a value loss near 0 on a solved task makes any
        # blip a large factor of it.
        if not math.isfinite(loss):
            return []
        if len(self.first_value_losses) < self.s.patience:
            self.first_value_losses.append(loss)
            return []
        early = median(self.first_value_losses)
        if not (early > 0 and loss > self.s.value_loss_factor * early):
            return []
        return [("value_loss_exploding", f"the value loss {loss:.3g} is {loss / early:,.0f}x its level in the first "
                                         f"updates ({early:.3g}): the critic is diverging. Likely algo.lr_critic too "
                                         f"high or returns that keep growing: lower algo.lr_critic, set "
                                         f"env.normalize_reward=true or algo.clip_range_vf")]

    def _returns(self, progress: float, returns: list[float], lengths: list[int]) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        if returns:
            mean = sum(returns) / len(returns)
            if len(self.first_returns) < self.s.patience:
                self.first_returns.append(mean)
            self.recent_returns.extend(returns)
            self.train_return = sum(self.recent_returns) / len(self.recent_returns)
            per_step = sum(abs(r) for r in returns) / max(sum(lengths), 1)
            if not self.normalize_reward and per_step > self.s.reward_scale_max:
                found.append(("reward_scale", f"the rewards average {per_step:.3g} a step in absolute value and "
                                              f"env.normalize_reward is off: the value loss and the gradients grow "
                                              f"with them (squared), and the clip then cuts every step. Set "
                                              f"env.normalize_reward=true (or scale the env's rewards)"))
        self.updates += 1
        if progress >= self.s.flat_after and self.updates >= self.s.patience_long and self._not_improved():
            before, now = median(self.first_returns), self.train_return
            found.append(("returns_flat", f"after {100 * progress:.0f}% of training the training return ({now:.3g}) "
                                          f"is no better than in the first updates ({before:.3g}): nothing is being "
                                          f"learned. Check the reward signal and the observations; try a larger "
                                          f"algo.ent_coef or another learning rate"))
        return found

    def _not_improved(self) -> bool:
        """Whether the recent training return is no better than the first updates' (doctor.flat_tolerance)."""
        if not self.first_returns or len(self.recent_returns) < 10 or self.train_return is None:
            return False
        before = median(self.first_returns)
        return self.train_return - before <= self.s.flat_tolerance * max(abs(before), 1.0)

    def _sps(self, sps: float) -> list[tuple[str, str]]:
        # A running peak of the median over a window of updates: constant work per update, however long the run.
        window = self.s.patience_long // 2 or 1
        self.sps_seen += 1
        if self.sps_seen == 1:  # the first update pays for starting up
            return []
        self.recent_sps.append(sps)
        if len(self.recent_sps) < window:
            return []
        now = median(self.recent_sps)
        self.sps_peak = peak = max(self.sps_peak, now)
        if self.sps_seen < 3 * window + 1 or now >= self.s.sps_drop * peak:
            return []
        return [("sps_dropping", f"steps per second fell to {now:,.0f} from {peak:,.0f} (median of {window} "
                                 f"updates): other work took the machine's cores, or something grows as training "
                                 f"runs (an env that slows down or leaks, memory filling up); watch the machine's "
                                 f"load, the process's memory and the env's step time")]

    # --- bookkeeping -------------------------------------------------------------------------------------------
    def _lasts(self, symptom: str, now: bool, updates: int, progress: float = 0.0, span: float = 0.0) -> bool:
        """Whether `now` has held for `updates` updates in a row (the streak of `symptom`), and over at least `span`
        of the run's steps (`progress`: how far the run is)."""
        count, began = self.streaks.get(symptom, (0, progress))
        self.streaks[symptom] = (count + 1, began if count else progress) if now else (0, progress)
        count, began = self.streaks[symptom]
        return count >= updates and progress - began >= span

    def _tell(self, step: int, found: list[tuple[str, str]]) -> list[Warning]:
        new = []
        for symptom, text in found:
            if symptom in self.told:
                continue
            self.told.add(symptom)
            warning = Warning(symptom, step, f"doctor: {symptom} at step {step:,}: {text}")
            self.warnings.append(warning)
            new.append(warning)
        return new
