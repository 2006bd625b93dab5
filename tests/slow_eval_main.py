"""`python -m ppo_cli.cli.train` as torchrun starts it, with the collectives' timeout cut to 3 s and every periodic
evaluation on rank 0 taking 6 s longer: the other ranks must wait for it (tests/test_distributed.py)."""

import time
from datetime import timedelta

from ppo_cli import distributed
from ppo_cli.cli.train import main
from ppo_cli.run.evaluation import PeriodicEvaluator

distributed.TIMEOUT = timedelta(seconds=3)
_periodic = PeriodicEvaluator.periodic


def _slow(self, *args, **kwargs):
    time.sleep(6)
    return _periodic(self, *args, **kwargs)


PeriodicEvaluator.periodic = _slow

if __name__ == "__main__":
    main()
