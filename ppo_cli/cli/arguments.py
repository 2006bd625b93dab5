"""The command lines of ppo-eval and ppo-export, apart from the tools: `--help` and argument errors need no torch
(the console scripts answer them before importing the tools, cli/launch.py)."""

from __future__ import annotations

import argparse

from ppo_cli.errors import OneLineParser
from ppo_cli.policy.formats import FORMATS, SUFFIXES


def eval_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="ppo-eval", description="Evaluate a ppo-cli checkpoint: run whole episodes "
                                "and report the return, next to a uniformly random policy on the same seeds.")
    p.add_argument("checkpoint", help="path to a checkpoint.pt written by ppo-train, or to a model written by "
                   "ppo-export (.onnx, .torchscript.pt: run through onnxruntime / TorchScript)")
    p.add_argument("--episodes", type=int, default=10, help="episodes to run (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation envs (default: 0)")
    p.add_argument("--stochastic", action="store_true",
                   help="sample actions from the policy instead of taking the most likely one")
    p.add_argument("--env", metavar="ID", help="evaluate on another env id with the same spaces (replaces the "
                   "checkpoint's env.id and env.entry_point)")
    p.add_argument("--trust-env-code", action="store_true",
                   help="let the file run code: its env recipe's imports and calls beyond ppo-cli's allowlist "
                        "(env.entry_point, a module:Id id, wrapper targets), its config's interpolations, and a "
                        "TorchScript model (a program: loading it runs it); without it such a file is refused and "
                        "nothing runs")
    p.add_argument("--max-episode-steps", type=int, metavar="N",
                   help="cut an episode after N steps (default: the run's eval.max_episode_steps); cut episodes "
                        "are counted and reported")
    p.add_argument("--num-envs", type=int, default=None,
                   help="parallel envs (default: min(episodes, the run's env.num_envs))")
    p.add_argument("--video", metavar="DIR", help="record every episode as mp4 into DIR (created if needed; "
                   "eval-episode-N.mp4, one env; needs the 'video' extra)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    p.add_argument("--opponent", metavar="random|CHECKPOINT", default=None,
                   help="algo=selfplay checkpoints: play against the uniformly random player (the default) or the "
                        "policy of another checkpoint.pt; prints win / draw / loss rates, overall and per seat")
    p.add_argument("--no-random-baseline", action="store_true", help="skip the random-policy reference run")
    return p


def export_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="ppo-export", description="Export a ppo-cli checkpoint's policy to ONNX or "
                                "TorchScript: raw observation in, env action out, observation normalization baked "
                                "in; a <file>.json beside it describes the spaces and the inputs and outputs.")
    p.add_argument("checkpoint", help="path to a checkpoint.pt (or best.pt) written by ppo-train")
    p.add_argument("--format", default="onnx", metavar="FORMAT",
                   help=f"{' or '.join(FORMATS)} (default: onnx; onnx needs the 'export' extra). A TorchScript file "
                        "is a program: loading it runs it (torch.jit.load has no safe mode), so whoever plays it must "
                        "trust its source (ppo-eval asks for --trust-env-code); ONNX holds no code")
    p.add_argument("--trust-env-code", action="store_true",
                   help="copy into the model a checkpoint env recipe that imports or calls code beyond ppo-cli's "
                        "allowlist, or a config with interpolations; without it such a checkpoint is refused")
    p.add_argument("--out", metavar="FILE", help="where to write the model (default: beside the checkpoint, "
                   f"<name>{SUFFIXES['onnx']} or <name>{SUFFIXES['torchscript']})")
    p.add_argument("--with-value", action="store_true", help="also output the critic's value V(s)")
    p.add_argument("--stochastic", action="store_true",
                   help="output the distribution (logits; a Gaussian's mean and log_std) instead of the action")
    p.add_argument("--action-mask", action="store_true",
                   help="take an `action_mask` input (for envs that give masks in info or action_masks(); a Dict "
                        "observation's action_mask key is read without it)")
    p.add_argument("--json", action="store_true", help="print the model's description (the sidecar JSON) only")
    return p
