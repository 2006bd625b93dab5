"""`ppo-export CHECKPOINT`: the checkpoint's policy as one ONNX or TorchScript file (and its JSON description)
that runs without ppo-cli (docs/export.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from ppo_cli.cli.arguments import export_parser
from ppo_cli.cli.evaluate import load_policy
from ppo_cli.config import env_label, stored_config
from ppo_cli.envs import recipe
from ppo_cli.errors import UserError, one_line_errors
from ppo_cli.policy.export import export_policy, sidecar_path
from ppo_cli.policy.formats import FORMATS, SUFFIXES
from ppo_cli.run import checkpoint


def run(args: argparse.Namespace) -> dict:
    if args.format not in FORMATS:  # checked by hand, not argparse choices: one line, as every other error
        raise UserError(f"--format {args.format}: unknown format (choose {' or '.join(FORMATS)})")
    source = Path(args.checkpoint)
    data = checkpoint.load(source)
    # The model carries the checkpoint's env recipe on to whoever plays it: what ppo-eval would refuse is not
    # passed on without the user's word either.
    recipe.check(stored_config(data["config_yaml"]), trusted=args.trust_env_code, what="checkpoint",
                 source=args.checkpoint, how="--trust-env-code")
    policy, cfg = load_policy(data)
    out = Path(args.out) if args.out else source.with_name(source.stem + SUFFIXES[args.format])
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the checkpoint itself; choose another file")
    # env_label: an entry_point env is named by its entry point, not by the default id left beside it.
    info = {"env_id": str(env_label(cfg.env)), "env": OmegaConf.to_container(cfg.env, resolve=True, enum_to_str=True),
            "global_step": int(data["global_step"]), "source_checkpoint": str(source)}
    return export_policy(policy, out, args.format, stochastic=args.stochastic, with_value=args.with_value,
                         action_mask=args.action_mask, info=info) | {"path": str(out)}


def _shape(port: dict) -> str:
    return f"{port['name']} {port['dtype']} [{', '.join(str(d) for d in port['shape'])}]"


def main(argv: list[str] | None = None) -> None:
    args = export_parser().parse_args(argv)
    with one_line_errors("ppo-export"):
        meta = run(args)
    path = meta.pop("path")
    if args.json:
        print(json.dumps(meta))
        return
    size = Path(path).stat().st_size
    print(f"wrote {path} ({meta['model_format']}, {size / 1024:,.1f} KiB) and {sidecar_path(path).name}")
    print(f"inputs:  {'; '.join(_shape(p) for p in meta['inputs'])}")
    print(f"outputs: {'; '.join(_shape(p) for p in meta['outputs'])}")
    print(f"check:   ppo-eval {path}")


if __name__ == "__main__":
    main()
