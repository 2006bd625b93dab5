"""One training run across processes: torch.distributed, started by `torchrun` (docs/distributed.md).

`torchrun --nproc_per_node=N -m ppo_cli.cli.train ...` (or the `ppo-train` script under torchrun) sets
WORLD_SIZE, RANK and LOCAL_RANK; `setup` reads them and joins the process group (gloo on the CPU, nccl on
GPUs). Detection from torchrun's environment rather than a config key: the launcher already decides the number
and placement of processes, and a config key could only disagree with it.

What the ranks share, and how (the trainer calls these):
- the gradients: averaged over ranks after every minibatch, before clipping (`average`), so every rank takes
  the same optimizer step and all hold the same parameters;
- the advantages' normalization: over each minibatch of all ranks together (`normalize`);
- the decisions: stop on a signal, stop at a target return, target-KL early stop (`any_true`, `mean`), so all
  ranks take the same number of steps;
- the observation statistics: merged after every rollout (`merge_obs_stats`), so all normalize alike;
- the episode returns, for logging and objectives (`gather`).
Each rank keeps its own envs (seeded apart), action samples, minibatch shuffles and reward scaling.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from ppo_cli.errors import UserError

if TYPE_CHECKING:
    import torch

# torch is imported by the functions that use it: ppo-train's command line (prepare_cli, from_environment,
# exit_after) and a one-process run's agreements (any_true, mean) start without it.
TIMEOUT = timedelta(minutes=10)  # a collective waits this long for a rank that went silent, then fails
# While rank 0 works alone (a periodic evaluation, which on Atari can take longer than TIMEOUT), the others wait in
# a group of their own with this timeout, so the wait does not depend on how long the work takes.
MAIN_WORK_TIMEOUT = timedelta(days=7)
_main_work: Any = None  # that group (gloo: a barrier of CPU tensors, whatever the device)


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_environment() -> Ranks:
    """The rank and world size torchrun set, without joining anything (1 process when it did not run us)."""
    return Ranks(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def setup(device: torch.device) -> Ranks:
    """Join the process group torchrun prepared; a single process returns Ranks() and joins nothing."""
    import torch
    import torch.distributed as dist

    ranks = from_environment()
    if not ranks.active or dist.is_initialized():
        return ranks
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; run one process or install a torch with it")
    backend = backend_for(device)
    if "nccl" in backend:
        if not dist.is_nccl_available():
            raise UserError("device=cuda under torchrun needs NCCL, which this torch build lacks; use device=cpu")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=TIMEOUT)
    global _main_work
    _main_work = dist.new_group(backend="gloo", timeout=MAIN_WORK_TIMEOUT)
    return ranks


def wait_for_main(ranks: Ranks) -> None:
    """Hold every rank here until rank 0 arrives, however long rank 0's work alone takes (MAIN_WORK_TIMEOUT)."""
    import torch.distributed as dist

    if ranks.active:
        dist.barrier(group=_main_work)


def backend_for(device: torch.device) -> str:
    """The process group's backend for a run on `device`. The gradients live on the device, but the decisions,
    statistics and normalization sums are small CPU tensors (any_true, mean, normalize, merge_obs_stats), and NCCL
    moves CUDA tensors only: a GPU run joins gloo for the CPU and nccl for CUDA."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()  # its subgroups too


def exit_after(body: Callable[[], Any]) -> NoReturn:
    """Run `body` (a rank's whole program), then end the process as Python would, less the interpreter's teardown.

    gloo's worker threads can still be releasing the last collective's tensors when the program ends, which takes
    the GIL; one that asks for it while the interpreter finalizes aborts the process ("terminate called without an
    active exception", pytorch/pytorch PR 179291), and torchrun then kills the other ranks, maybe mid-write.
    destroy_process_group leaves the group (and its threads) alive in reference cycles, and collecting it joins
    those threads while holding the GIL, which can deadlock on the same release. So a rank ends the way
    finalization would, in order, and then os._exit: other threads joined, exit handlers run, streams flushed."""
    try:
        body()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - printed as Python would, then the same exit status
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # noqa: SLF001 - what finalization would run; os._exit skips it
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say
            pass
    os._exit(code)


def average(flat: torch.Tensor, ranks: Ranks) -> None:
    """Replace `flat` by its mean over ranks, in place."""
    import torch.distributed as dist

    dist.all_reduce(flat)
    flat.div_(ranks.world)


def normalize(values: torch.Tensor, ranks: Ranks, eps: float = 1e-8) -> None:
    """(values - mean) / (std + eps) in place, with the mean and the unbiased std of every rank's values together
    (one all-reduce of three numbers)."""
    import torch
    import torch.distributed as dist

    v = values.double()
    sums = torch.stack([v.sum(), v.square().sum(), torch.tensor(float(v.numel()), dtype=torch.float64)]).cpu()
    dist.all_reduce(sums)
    total, squares, count = sums.tolist()
    mean = total / count
    std = max((squares - count * mean * mean) / max(count - 1.0, 1.0), 0.0) ** 0.5
    values.sub_(mean).div_(std + eps)


def any_true(flag: bool, ranks: Ranks) -> bool:
    import torch
    import torch.distributed as dist

    if not ranks.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean(value: float, ranks: Ranks) -> float:
    import torch
    import torch.distributed as dist

    if not ranks.active:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / ranks.world


def gather(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    import torch.distributed as dist

    if not ranks.active:
        return [obj]
    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def others_parts(own: dict[str, Any], policy: Any, ranks: Ranks) -> list[dict[str, Any]] | None:
    """The other ranks' parts of a checkpoint's state, gathered (every rank calls this at the same point; None in
    one process), after checking that every rank holds the same parameters, as the averaged updates keep them."""
    if not ranks.active:
        return None
    checksum = float(sum(p.detach().double().abs().sum() for p in policy.parameters()))
    gathered = gather({**own, "param_checksum": checksum}, ranks)
    if len({g["param_checksum"] for g in gathered}) != 1:
        raise RuntimeError(f"the ranks' parameters diverged (checksums {[g['param_checksum'] for g in gathered]}); "
                           f"this is a bug in ppo-cli")
    return [{k: v for k, v in g.items() if k != "param_checksum"} for g in gathered[1:]]


def merge_obs_stats(norm: Any, before: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ranks: Ranks) -> None:
    """Give every rank the statistics one process would have after seeing all ranks' observations since
    `before` (mean, var, count as they were at the rollout's start, the same on every rank).

    Each rank's own observations are recovered from its statistics before and after (Chan et al.'s merge
    undone), gathered, and merged into `before` in rank order, so every rank computes the same numbers."""
    import torch

    if not ranks.active or norm is None:
        return
    m0, v0, n0 = (t.double() for t in before)
    m1, v1, n1 = norm.mean.double(), norm.var.double(), norm.count.double()
    nb = n1 - n0
    mb = (m1 * n1 - m0 * n0) / nb
    m2b = v1 * n1 - v0 * n0 - (mb - m0).square() * n0 * nb / n1
    parts = gather(torch.cat([nb.reshape(1), mb, m2b]).cpu(), ranks)
    mean_, m2, count = m0.cpu(), (v0 * n0).cpu(), n0.cpu()
    d = mean_.numel()
    for p in parts:
        c, m, s = p[0], p[1:1 + d], p[1 + d:]
        total = count + c
        delta = m - mean_
        mean_ = mean_ + delta * c / total
        m2 = m2 + s + delta.square() * count * c / total
        count = total
    with torch.no_grad():
        norm.mean.copy_(mean_)
        norm.var.copy_(m2 / count)
        norm.count.copy_(count)
    norm._refresh()


class _RankLines:
    """stderr with every line prefixed by the rank: under torchrun the ranks' messages interleave."""

    def __init__(self, stream: Any, rank: int) -> None:
        self.stream, self.prefix, self.at_line_start = stream, f"[rank {rank}] ", True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            out.append((self.prefix if self.at_line_start else "") + piece)
            self.at_line_start = piece.endswith("\n")
        self.stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def prepare_cli(argv: list[str]) -> list[str]:
    """ppo-train's arguments for this rank under torchrun: rank 0 runs as usual; the others print nothing on
    stdout and get a scratch folder of their own for Hydra (they write no files of the run). Errors on stderr
    name the rank."""
    import atexit
    import shutil
    import sys
    import tempfile

    ranks = from_environment()
    if not ranks.active:
        return argv
    sys.stderr = _RankLines(sys.stderr, ranks.rank)
    if ranks.main:
        return argv
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    scratch = tempfile.mkdtemp(prefix=f"ppo-cli-rank{ranks.rank}-")
    atexit.register(shutil.rmtree, scratch, True)
    kept = [a for a in argv if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    return [*kept, f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
