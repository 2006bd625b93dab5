"""`ppo-eval CHECKPOINT`: score a saved policy, rebuilt from the checkpoint alone; or a model written by ppo-export
(ONNX or TorchScript), played through onnxruntime or torch.jit on the same envs and seeds."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import torch
from omegaconf import DictConfig, OmegaConf

from ppo_cli import checkpoint, export
from ppo_cli.config import EnvConfig, config_from_yaml
from ppo_cli.envs import describe_space, make_vec_env
from ppo_cli.errors import UserError, extra_hint
from ppo_cli.evaluation import EvalResult, evaluate, evaluate_random, run_episodes
from ppo_cli.policy import ActorCritic, build_policy


def load_policy(data: dict) -> tuple[ActorCritic, DictConfig]:
    """The policy and run config stored in a loaded checkpoint (no config files needed)."""
    cfg = config_from_yaml(data["config_yaml"])
    policy = build_policy(data["observation_space"], data["action_space"], cfg)
    try:
        policy.load_state_dict(data["policy"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint weights do not fit its own network config ({str(exc).splitlines()[0]})") from None
    policy.eval()
    return policy, cfg  # type: ignore[return-value]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ppo-eval", description="Evaluate a ppo-cli checkpoint: run whole episodes "
                                "and report the return, next to a uniformly random policy on the same seeds.")
    p.add_argument("checkpoint", help="path to a checkpoint.pt written by ppo-train, or to a model written by "
                   "ppo-export (.onnx, .torchscript.pt: run through onnxruntime / TorchScript)")
    p.add_argument("--episodes", type=int, default=10, help="episodes to run (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation envs (default: 0)")
    p.add_argument("--stochastic", action="store_true",
                   help="sample actions from the policy instead of taking the most likely one")
    p.add_argument("--env", metavar="ID", help="evaluate on another env id with the same spaces")
    p.add_argument("--num-envs", type=int, default=None,
                   help="parallel envs (default: min(episodes, the run's env.num_envs))")
    p.add_argument("--video", metavar="DIR", help="record every episode as mp4 into DIR (needs the 'video' extra)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    p.add_argument("--no-random-baseline", action="store_true", help="skip the random-policy reference run")
    return p


def _video_wrappers(folder: str, episodes: int) -> list:
    try:
        import moviepy  # noqa: F401
    except ImportError:
        raise UserError(f"--video needs moviepy: {extra_hint('video')}") from None
    Path(folder).mkdir(parents=True, exist_ok=True)

    def wrap(env: gym.Env) -> gym.Env:
        # Recording runs on one env. Its episode 0 is the env factory's seeding reset; episodes 1..N are the
        # evaluated ones; the one the autoreset starts after the last is not recorded.
        return gym.wrappers.RecordVideo(env, folder, episode_trigger=lambda e: 1 <= e <= episodes,
                                        name_prefix="eval", disable_logger=True)

    return [wrap]


def run(args: argparse.Namespace) -> dict:
    if args.episodes < 1:
        raise UserError(f"--episodes={args.episodes}: must be >= 1")
    if args.num_envs is not None and args.num_envs < 1:
        raise UserError(f"--num-envs={args.num_envs}: must be >= 1")
    fmt = export.detect(args.checkpoint)
    play: Callable[[gym.vector.VectorEnv], EvalResult]
    if fmt is None:
        data = checkpoint.load(args.checkpoint)
        policy, cfg = load_policy(data)
        env_cfg = cfg.env.copy()
        expected, global_step = (data["observation_space"], data["action_space"]), int(data["global_step"])

        def play(envs: gym.vector.VectorEnv) -> EvalResult:
            with torch.inference_mode():
                return evaluate(policy, envs, args.episodes, args.seed, deterministic=not args.stochastic)
    else:
        model = export.ExportedModel(args.checkpoint, fmt)
        env_cfg = _exported_env(model)
        meta = model.metadata
        expected, global_step = (meta["observation_space"], meta["action_space"]), int(meta.get("global_step", 0))

        def play(envs: gym.vector.VectorEnv) -> EvalResult:
            act = model.actor(envs.num_envs, deterministic=not args.stochastic, seed=args.seed)
            return run_episodes(envs, act, args.episodes, args.seed)
    if args.env:
        env_cfg.id = args.env
    num_envs = args.num_envs or min(args.episodes, env_cfg.num_envs)
    if args.video:
        num_envs = 1  # one recorder, so the files are exactly the evaluated episodes, in order
    wrappers = _video_wrappers(args.video, args.episodes) if args.video else []
    try:
        envs = make_vec_env(env_cfg, seed=args.seed, num_envs=num_envs,
                            render_mode="rgb_array" if args.video else None, wrappers=wrappers)
        try:
            spaces = (describe_space(envs.single_observation_space),
                      describe_space(envs.single_action_space, bounds=True))
            if spaces != expected:
                raise UserError(f"env {env_cfg.id!r} has spaces {spaces[0]} / {spaces[1]}, but the policy was "
                                f"trained for {expected[0]} / {expected[1]}")
            result = play(envs)
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
        raise UserError(f"--video: {env_cfg.id!r} could not render ({type(exc).__name__}: {first}){hint}") from None
    baseline: EvalResult | None = None
    if not args.no_random_baseline:
        rand_envs = make_vec_env(env_cfg, seed=args.seed, num_envs=num_envs)
        try:
            baseline = evaluate_random(rand_envs, args.episodes, args.seed)
        finally:
            rand_envs.close()
    exported = {} if fmt is None else {"model_format": fmt}
    return {**result.summary(), "returns": result.returns, "global_step": global_step,
            "env_id": str(env_cfg.id), "deterministic": not args.stochastic, "seed": args.seed,
            "random_mean_return": baseline.mean_return if baseline else None,
            "random_std_return": baseline.std_return if baseline else None,
            "checkpoint": str(args.checkpoint), **exported}


def _exported_env(model: export.ExportedModel) -> DictConfig:
    """The env an exported model was trained on, from its metadata (--env replaces the id)."""
    try:
        return OmegaConf.merge(OmegaConf.structured(EnvConfig), model.metadata.get("env") or {})  # type: ignore[return-value]
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
    if r["random_mean_return"] is not None:
        print(f"random policy: {r['random_mean_return']:.2f} +/- {r['random_std_return']:.2f} (same seeds)")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        result = run(args)
    except UserError as exc:
        print(f"ppo-eval: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)


if __name__ == "__main__":
    main()
