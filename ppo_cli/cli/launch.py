"""The console scripts: each imports its tool's module and runs its `main`.

Importing a tool takes a second or more (torch, Hydra, gymnasium), and a Ctrl-C in that second would otherwise
end in Python's traceback through the imports: here it is one line, as it is once the tool runs.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


def _launch(module: str, prog: str, light_parser: str | None = None) -> Any:
    if light_parser is not None and (len(sys.argv) < 2 or any(a in ("-h", "--help") for a in sys.argv[1:])):
        # Help, or the usage error of no argument: answered from the arguments alone, without torch (seconds).
        from ppo_cli.cli import arguments

        getattr(arguments, light_parser)().parse_args(sys.argv[1:])
    try:
        main = importlib.import_module(module).main
    except KeyboardInterrupt:
        print(f"{prog}: interrupted by SIGINT while starting; nothing was written", file=sys.stderr, flush=True)
        sys.exit(130)
    return main()  # the console script exits with what main returns


def train() -> Any:
    return _launch("ppo_cli.cli.train", "ppo-train")


def evaluate() -> Any:
    return _launch("ppo_cli.cli.evaluate", "ppo-eval", "eval_parser")


def sweep_report() -> Any:
    return _launch("ppo_cli.cli.sweep_report", "ppo-sweep-report")


def export() -> Any:
    return _launch("ppo_cli.cli.export", "ppo-export", "export_parser")
