"""`ppo-eval CHECKPOINT`: score a saved policy, rebuilt from the checkpoint alone; or a model written by ppo-export
(ONNX or TorchScript), played through onnxruntime or torch.jit on the same envs and seeds."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from omegaconf import DictConfig, OmegaConf

from ppo_cli.algo.ppo import policy_player
from ppo_cli.cli.arguments import eval_parser
from ppo_cli.config import EnvConfig, EvalConfig, choice, config_from_yaml, env_label, stored_config
from ppo_cli.envs import recipe
from ppo_cli.envs.agents import ParallelVectorEnv
from ppo_cli.envs.make import make_vec_env
from ppo_cli.envs.selfplay import OpponentPool
from ppo_cli.envs.spaces import describe_space, same_space
from ppo_cli.errors import UserError, extra_hint, one_line_errors
from ppo_cli.policy import exported
from ppo_cli.policy.actor_critic import ActorCritic, build_policy
from ppo_cli.run import checkpoint
from ppo_cli.run.evaluation import EvalResult, cut_note, evaluate, evaluate_random, run_episodes


def load_policy(data: dict) -> tuple[ActorCritic, DictConfig]:
    """The policy and run config stored in a loaded checkpoint (no config files needed)."""
    cfg = config_from_yaml(data["config_yaml"])
    try:
        policy = build_policy(data["observation_space"], data["action_space"], cfg)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        # The descriptions are plain data (envs.describe_space); a damaged one fails wherever it is first read.
        spaces = f"{data['observation_space']} / {data['action_space']}"
        raise UserError(f"the checkpoint's space description is damaged ({type(exc).__name__}: {exc}; read "
                        f"{spaces[:200]}{'...' if len(spaces) > 200 else ''})") from None
    if not isinstance(data["policy"], dict):
        raise UserError(f"the checkpoint's policy entry is a {type(data['policy']).__name__}, not a mapping of "
                        f"tensors: the file is damaged")
    try:
        policy.load_state_dict(data["policy"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise UserError(f"checkpoint weights do not fit its own network config ({str(exc).splitlines()[0]})") from None
    bad = [name for name, t in policy.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise UserError(f"the checkpoint's weights hold NaN or inf ({', '.join(bad[:3])}"
                        f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}): the run diverged before this "
                        f"checkpoint was written; evaluate an earlier one (best.pt)")
    policy.eval()
    return policy, cfg  # type: ignore[return-value]


VIDEO_PREFIX = "eval"


def _video_files(folder: str, episodes: int) -> list[Path]:
    """The files RecordVideo writes for evaluated episodes 1..N (its episode 0 is the seeding reset)."""
    return [Path(folder) / f"{VIDEO_PREFIX}-episode-{e}.mp4" for e in range(1, episodes + 1)]


class CopyVideo:
    """Episodes 1..N of a PettingZoo parallel env's copy 0 (agents.ParallelVectorEnv.recorder calls it with each
    frame), written as RecordVideo names its files, episode 0 being the seeding reset's as there."""

    def __init__(self, folder: str, episodes: int, fps: float) -> None:
        self.folder, self.episodes, self.fps = folder, episodes, fps
        self.episode, self.frames = -1, []

    def __call__(self, frame: Any, event: str) -> None:
        if event == "reset":
            self.episode, self.frames = self.episode + 1, [frame]
            return
        self.frames.append(frame)
        if event == "end" and 1 <= self.episode <= self.episodes:
            from gymnasium.utils.save_video import save_video

            save_video(self.frames, self.folder, episode_trigger=lambda _: True, name_prefix=VIDEO_PREFIX,
                       episode_index=self.episode, fps=self.fps)


def _video_wrappers(folder: str, episodes: int) -> list:
    try:
        import moviepy  # noqa: F401
    except ImportError:
        raise UserError(f"--video needs moviepy: {extra_hint('video')}") from None
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--video {folder}: cannot create the folder ({exc.strerror or type(exc).__name__})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--video {folder}: the folder is not writable")
    # rgb_array rendering draws off screen; without this, pygame's SDL looks for a display and prints an
    # XDG_RUNTIME_DIR error on machines without one. A user's own setting stays.
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

    def wrap(env: gym.Env) -> gym.Env:
        # Recording runs on one env. Its episode 0 is the env factory's seeding reset; episodes 1..N are the
        # evaluated ones; the one the autoreset starts after the last is not recorded.
        if isinstance(env, ParallelVectorEnv):  # a PettingZoo env's copy 0, every agent in one frame
            env.recorder = CopyVideo(folder, episodes, env.metadata.get("render_fps") or 30)
            return env
        with warnings.catch_warnings():  # "Overwriting existing videos" is said of any existing folder: ours
            warnings.filterwarnings("ignore", message=".*Overwriting existing videos")
            return gym.wrappers.RecordVideo(env, folder, episode_trigger=lambda e: 1 <= e <= episodes,
                                            name_prefix=VIDEO_PREFIX, disable_logger=True)

    return [wrap]


def _file_env(config: Any, args: argparse.Namespace, what: str, env_only: bool = False) -> None:
    """Refuse the file's config where it would run or resolve anything the user did not ask for (recipe.py);
    the keys the user's --env names are theirs."""
    named = ("env.id", "env.entry_point") if args.env else ()
    recipe.check(config, trusted=args.trust_env_code, what=what, source=args.checkpoint,
                 how="--trust-env-code (or name the env with --env)", named=named, env_only=env_only)


@contextmanager
def progress(episodes: int) -> Iterator[Callable[[float, int], None] | None]:
    """A bar on stderr from the first second while the episodes play, advanced as each ends (on a terminal only:
    --json, pipes and logs get the result alone)."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]ppo-eval"), BarColumn(), MofNCompleteColumn(), TextColumn("episodes"),
                  TimeElapsedColumn(), TextColumn("{task.fields[last]}"), console=Console(stderr=True),
                  transient=True) as bar:
        task = bar.add_task("episodes", total=episodes, last="")
        yield lambda ret, length: bar.update(task, advance=1, last=f"last: return {ret:.2f}, length {length:,}")


def _with_env_arg(env_cfg: DictConfig, args: argparse.Namespace) -> DictConfig:
    """The env to score: the file's recipe, or the one --env names (its entry point cleared too, else that env
    would be scored)."""
    if args.env:
        env_cfg.id, env_cfg.entry_point = args.env, None
    return env_cfg


def run(args: argparse.Namespace) -> dict:
    if args.episodes < 1:
        raise UserError(f"--episodes={args.episodes}: must be >= 1")
    if args.num_envs is not None and args.num_envs < 1:
        raise UserError(f"--num-envs={args.num_envs}: must be >= 1")
    if args.seed < 0:  # gymnasium seeds envs with seed, seed + 1, ...: non-negative integers only
        raise UserError(f"--seed={args.seed}: must be >= 0")
    if args.max_episode_steps is not None and args.max_episode_steps < 1:
        raise UserError(f"--max-episode-steps={args.max_episode_steps}: must be >= 1")
    fmt = exported.detect(args.checkpoint)
    opponents: OpponentPool | None = None
    play: Callable[[gym.vector.VectorEnv, Callable[[float, int], None] | None], EvalResult]
    if fmt is None:
        data = checkpoint.load(args.checkpoint)
        _file_env(stored_config(data["config_yaml"]), args, "checkpoint")
        policy, cfg = load_policy(data)
        env_cfg = _with_env_arg(cfg.env.copy(), args)
        opponents = _opponents(args, cfg)
        max_steps = int(cfg.eval.max_episode_steps)
        expected, global_step = (data["observation_space"], data["action_space"]), int(data["global_step"])

        def play(envs: gym.vector.VectorEnv, tick: Callable[[float, int], None] | None) -> EvalResult:
            with torch.inference_mode():
                return evaluate(policy, envs, args.episodes, args.seed, deterministic=not args.stochastic,
                                on_episode=tick)
    else:
        if args.opponent is not None:
            raise UserError("--opponent plays the policy of a checkpoint.pt trained with algo=selfplay, not an export")
        model = exported.ExportedModel(args.checkpoint, fmt, run_code=args.trust_env_code)
        _file_env(model.metadata.get("env") or {}, args, "model", env_only=True)
        model.load()
        env_cfg = _with_env_arg(_exported_env(model), args)
        max_steps = EvalConfig.max_episode_steps  # an export carries the env, not the run's eval settings
        meta = model.metadata
        expected, global_step = (meta["observation_space"], meta["action_space"]), int(meta.get("global_step", 0))

        def play(envs: gym.vector.VectorEnv, tick: Callable[[float, int], None] | None) -> EvalResult:
            act = model.actor(envs.num_envs, deterministic=not args.stochastic, seed=args.seed)
            return run_episodes(envs, act, args.episodes, args.seed, on_episode=tick)
    if args.max_episode_steps is not None:
        max_steps = args.max_episode_steps
    elif max_steps < 1:
        raise UserError(f"the checkpoint's eval.max_episode_steps={max_steps}: must be >= 1 (set "
                        f"--max-episode-steps N)")
    label = str(env_label(env_cfg))
    num_envs = args.num_envs or min(args.episodes, env_cfg.num_envs)
    if args.video:
        num_envs = 1  # one recorder, so the files are exactly the evaluated episodes, in order
    videos_before = [f for f in _video_files(args.video, args.episodes) if f.exists()] if args.video else []
    wrappers = _video_wrappers(args.video, args.episodes) if args.video else []
    try:
        envs = make_vec_env(env_cfg, seed=args.seed, num_envs=num_envs,
                            render_mode="rgb_array" if args.video else None, wrappers=wrappers, step_cap=max_steps,
                            opponents=opponents)
        try:
            spaces = (describe_space(envs.single_observation_space),
                      describe_space(envs.single_action_space, bounds=True))
            if not (same_space(expected[0], spaces[0]) and same_space(expected[1], spaces[1])):
                raise UserError(f"env {label!r} has spaces {spaces[0]} / {spaces[1]}, but the policy was "
                                f"trained for {expected[0]} / {expected[1]}")
            with progress(args.episodes) as tick:
                result = play(envs, tick)
            games = {} if opponents is None else outcomes(envs, result, args.opponent or "random")
        finally:
            with warnings.catch_warnings():  # a failed recording warns about zero frames; the error says more
                warnings.simplefilter("ignore")
                envs.close()
    except gym.error.DependencyNotInstalled as exc:  # rendering for --video needs extra packages
        raise UserError(f"{exc} (for --video: {extra_hint('video')})") from None
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - renderers (OpenGL for MuJoCo) fail in many ways
        if not args.video:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        hint = (" (MuJoCo renders without a display with MUJOCO_GL=egl or MUJOCO_GL=osmesa, which need the "
                "system's EGL or OSMesa library)" if "OpenGL" in first or "mujoco" in type(exc).__module__ else "")
        raise UserError(f"--video: {label!r} could not render ({type(exc).__name__}: {first}){hint}") from None
    baseline: EvalResult | None = None
    if not args.no_random_baseline:
        rand_envs = make_vec_env(env_cfg, seed=args.seed, num_envs=num_envs, step_cap=max_steps, opponents=opponents)
        try:
            baseline = evaluate_random(rand_envs, args.episodes, args.seed)
        finally:
            rand_envs.close()
    extra: dict = {**games, **({} if fmt is None else {"model_format": fmt})}
    if args.video:
        extra.update(video_dir=str(Path(args.video).resolve()),
                     videos=[str(f) for f in _video_files(args.video, args.episodes) if f.exists()],
                     videos_replaced=len(videos_before))
    return {**result.summary(), "returns": result.returns, "global_step": global_step,
            "env_id": label, "deterministic": not args.stochastic, "seed": args.seed,
            "max_episode_steps": max_steps,
            "random_mean_return": baseline.mean_return if baseline else None,
            "random_std_return": baseline.std_return if baseline else None,
            "random_cut_episodes": baseline.cut if baseline else None,
            "checkpoint": str(args.checkpoint), **extra}


def _opponents(args: argparse.Namespace, cfg: DictConfig) -> OpponentPool | None:
    """algo=selfplay: the opponent --opponent names (the random player, or another checkpoint's policy)."""
    if choice(cfg.algo.get("multi_agent")) != "selfplay":
        if args.opponent is not None:
            raise UserError("--opponent applies to checkpoints of two-player games trained with algo=selfplay")
        return None
    if args.opponent in (None, "random"):
        return OpponentPool(1)
    data = checkpoint.load(args.opponent)
    recipe.check(stored_config(data["config_yaml"]), trusted=args.trust_env_code, what="opponent checkpoint",
                 source=args.opponent, how="--trust-env-code")
    other, other_cfg = load_policy(data)
    if choice(other_cfg.algo.get("multi_agent")) != "selfplay" or other_cfg.env.id != cfg.env.id:
        raise UserError(f"--opponent={args.opponent}: a checkpoint of {other_cfg.env.id!r}, not a self-play policy "
                        f"of {cfg.env.id!r}")
    pool = OpponentPool(1, keep_random=False)
    pool.add(policy_player(other))
    return pool


def outcomes(envs: gym.vector.VectorEnv, result: EvalResult, opponent: str) -> dict[str, Any]:
    """Win / draw / loss rates of the counted games, overall and from each seat (envs/selfplay.py: every env's
    games alternate seats, the first seat first, and keep their outcomes in order)."""
    games = [env.unwrapped.outcomes for env in envs.unwrapped.envs]
    seen = [0] * len(games)
    by_seat: dict[int, list[float]] = {0: [], 1: []}
    for env_index, ret in zip(result.played_in, result.returns, strict=True):
        seat, _ = games[env_index][seen[env_index]]
        seen[env_index] += 1
        by_seat[seat].append(ret)

    def rates(returns: list[float]) -> dict[str, float]:
        n = max(len(returns), 1)
        return {"win_rate": sum(r > 0 for r in returns) / n, "draw_rate": sum(r == 0 for r in returns) / n,
                "loss_rate": sum(r < 0 for r in returns) / n, "games": len(returns)}

    return {**{k: v for k, v in rates(result.returns).items() if k != "games"}, "opponent": opponent,
            "first_player": rates(by_seat[0]), "second_player": rates(by_seat[1])}


def _exported_env(model: exported.ExportedModel) -> DictConfig:
    """The env an exported model was trained on, from its metadata."""
    try:
        env = OmegaConf.merge(OmegaConf.structured(EnvConfig), model.metadata.get("env") or {})
        OmegaConf.resolve(env)  # only interpolations the user trusted get here (_file_env)
        return env  # type: ignore[return-value]
    except Exception as exc:  # noqa: BLE001 - any OmegaConf validation error means the same thing here
        raise UserError(f"the env config in {model.path}'s metadata does not fit this ppo-cli version "
                        f"({str(exc).strip().splitlines()[0]})") from None


def _print(r: dict) -> None:
    mode = "deterministic" if r["deterministic"] else "stochastic"
    if "model_format" in r:
        print(f"model:        {r['checkpoint']} ({r['model_format']} export of a policy trained {r['global_step']:,} "
              f"steps)")
    else:
        print(f"checkpoint:   {r['checkpoint']} (trained {r['global_step']:,} steps)")
    print(f"env:          {r['env_id']}, {r['episodes']} episodes, {mode}, seed {r['seed']}")
    print(f"return:       {r['mean_return']:.2f} +/- {r['std_return']:.2f} "
          f"(min {r['min_return']:.2f}, max {r['max_return']:.2f})")
    print(f"mean length:  {r['mean_length']:.1f}")
    cap = r["max_episode_steps"]
    if r["cut_episodes"]:
        print(f"cut:          {cut_note(r['cut_episodes'], r['episodes'], cap, '--max-episode-steps')}")
    if r["random_mean_return"] is not None:
        cut = f"; {r['random_cut_episodes']} cut at {cap:,} steps" if r["random_cut_episodes"] else ""
        print(f"random policy: {r['random_mean_return']:.2f} +/- {r['random_std_return']:.2f} (same seeds{cut})")
    if "win_rate" in r:
        print(f"games:        against {r['opponent']}: won {r['win_rate']:.0%}, drew {r['draw_rate']:.0%}, lost "
              f"{r['loss_rate']:.0%}")
        for seat in ("first_player", "second_player"):
            s = r[seat]
            print(f"  as {seat.replace('_', ' ')}: {s['games']} games, won {s['win_rate']:.0%}, drew "
                  f"{s['draw_rate']:.0%}, lost {s['loss_rate']:.0%}")
    if "agent_returns" in r:
        shown = ", ".join(f"{name} {v:.2f}" for name, v in r["agent_returns"].items())
        print(f"agents:       {shown} (team return above: their sum)")
    if "video_dir" in r:
        names = [Path(v).name for v in r["videos"]]
        notes = [f"{names[0]} to {names[-1]}" if len(names) > 1 else names[0]] if names else []
        if r["videos_replaced"]:
            n = r["videos_replaced"]
            notes.append(f"{n} earlier file{'s' if n > 1 else ''} of these names replaced")
        print(f"videos:       {len(names)} mp4 files in {r['video_dir']}" + (f" ({'; '.join(notes)})" if notes else ""))


def main(argv: list[str] | None = None) -> None:
    args = eval_parser().parse_args(argv)
    with one_line_errors("ppo-eval"):
        result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)


if __name__ == "__main__":
    main()
