"""Which device a run trains on: `device=cpu` / `cuda` force it; `device=auto` picks the faster one for the policy.
And how the rollout's per-step arrays cross between the envs (host) and that device (`HostStaging`); on the CPU,
that the memory a training step frees is kept for the next (`keep_freed_memory`).

The rule comes from measurements on one H100 with 16 CPU cores (issue 16's table, CartPole, each tool's best): an
MLP with 8 envs, [64, 64] and minibatches of 64 ran 6.3x faster on the CPU (the numpy path: per-step GPU launches
and host syncs cost more than the arithmetic), while 64 envs, [256, 256], minibatches of 2,048 ran 1.8x faster on
cuda, and 256 envs, [512, 512], minibatches of 8,192 17.8x faster. The work of one minibatch step grows with
batch_size x width^2: 2.6e5 at the first, 1.3e8 at the second; auto switches to the GPU at 6e6, about their
geometric mean. CNNs, whose convolutions dwarf any launch overhead, always go to the GPU.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from typing import Any, NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig

from ppo_cli.config import IMAGE_ENCODERS, choice
from ppo_cli.errors import UserError

GPU_WORK = 6e6  # batch_size x (widest hidden layer)^2 from which an MLP trains faster on the GPU
# torch's own thread count (a thread per physical core, or OMP_NUM_THREADS), read before any run sets it.
DEFAULT_THREADS = torch.get_num_threads()


class DeviceChoice(NamedTuple):
    device: torch.device
    reason: str


def choose_device(cfg: DictConfig) -> DeviceChoice:
    """The device for `cfg` and why, in a few words for the start banner."""
    name = choice(cfg.device)
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device='cuda': torch sees no CUDA GPU here (use device=cpu or device=auto)")
    if name != "auto":
        return DeviceChoice(torch.device(name), f"device={name}")
    if not torch.cuda.is_available():
        return DeviceChoice(torch.device("cpu"), "auto: torch sees no CUDA GPU")
    net = cfg.network
    assert choice(net.type) != "auto", "settle_network decides network=auto before the device is chosen"
    if choice(net.type) != "mlp":
        return DeviceChoice(torch.device("cuda"), f"auto: a GPU and a {choice(net.type)} encoder")
    width = max(net.net_arch, default=0)
    work = cfg.algo.batch_size * width ** 2
    if work >= GPU_WORK:
        return DeviceChoice(torch.device("cuda"), f"auto: an MLP of width {width} with minibatches of "
                                                  f"{cfg.algo.batch_size} is faster on the GPU")
    return DeviceChoice(torch.device("cpu"), f"auto: an MLP of width {width} with minibatches of "
                                             f"{cfg.algo.batch_size} is faster on the CPU than on the GPU here "
                                             f"(device=cuda forces it)")


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: CUDA GPUs from Ampere on, CPUs with AVX512-BF16 or AMX
    (oneDNN's check). Elsewhere bfloat16 is emulated, and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private oneDNN query; a torch without it says nothing
        return False


def resolve_precision(precision: str, network_type: str, device: torch.device) -> str:
    """The dtype name the encoder computes in: network.precision with `auto` decided for `device`. Only image
    encoders compute in bfloat16."""
    if precision != "auto":
        return precision
    return "bfloat16" if network_type in IMAGE_ENCODERS and native_bfloat16(device) else "float32"


def precision_text(cfg: DictConfig, device: torch.device) -> str:
    """For the banner's device line: '' where the network computes in float32 without a choice, else what
    network.precision does here."""
    asked, kind = choice(cfg.network.precision), choice(cfg.network.type)
    if kind not in IMAGE_ENCODERS or asked == "float32":
        return ""
    native = native_bfloat16(device)
    if asked == "auto":
        here = f"this {device.type.upper()} computes bfloat16 natively" if native else \
            f"this {device.type.upper()} has no native bfloat16"
        dtype = "bfloat16" if native else "float32"
        return f"; encoder in {dtype} (network.precision=auto: {here})"
    if native:
        return "; encoder in bfloat16 (network.precision)"
    return (f"; encoder in bfloat16 (network.precision), which this {device.type.upper()} only emulates: slower "
            f"than float32 here")


def torch_threads(cfg: DictConfig) -> int:
    """The torch_threads a run uses, `null` (auto) resolved: 1 for MLPs, whose small matrix products a second
    thread only slows; for image encoders, whose convolutions split well, torch's default (a thread per physical
    core) divided among the processes a torchrun starts on this machine. 0 keeps the libraries' defaults."""
    if cfg.torch_threads is not None:
        return int(cfg.torch_threads)
    if choice(cfg.network.type) not in IMAGE_ENCODERS:
        return 1
    return max(1, DEFAULT_THREADS // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


# glibc's malloc options (mallopt's parameter numbers, malloc.h): the size from which a block is mmap'ed on its own,
# and how much free memory at the heap's top it keeps rather than hand back to the kernel.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit: a minibatch of 256 84x84x4 frames in float32 is 28.9 MB
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a CPU training step frees for the next step (True where it now does).

    A CNN's minibatch step allocates tens of MB of activations and gradients and frees them all. By default
    glibc maps a block that large on its own and unmaps it when freed, or trims the heap's free top back to the
    kernel, so every step pages the same memory in again: 6,000-20,000 page faults a step on the Nature CNN at
    256 images, each a kernel entry and a zeroed 4 KB page. Raising the two thresholds keeps those pages mapped;
    the peak memory is the same, and it is held until the process ends rather than given back between steps.
    Not where the user set these thresholds (MALLOC_*_THRESHOLD_, GLIBC_TUNABLES) or preloaded another allocator
    (LD_PRELOAD: jemalloc, tcmalloc), nor off glibc."""
    env = os.environ
    if (sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or env.get("LD_PRELOAD")
            or "MALLOC_MMAP_THRESHOLD_" in env or "MALLOC_TRIM_THRESHOLD_" in env
            or "glibc.malloc" in env.get("GLIBC_TUNABLES", "")):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (the CPU: MemAvailable; a GPU: its free memory), or None
    where it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return ""


def check_fits(needed: int, device: torch.device, what: str, fix: str) -> None:
    """Refuse, in one line with both figures, an allocation of `needed` bytes that `device` cannot hold: the
    allocator's own error is a traceback, and on the CPU the system may instead swap or hang."""
    available = available_memory(device)
    if available is not None and needed > available:
        raise UserError(f"{what} needs about {_size(needed)}, more than the {_size(available)} of memory available "
                        f"on {device.type}; {fix}")


def stages(device: torch.device) -> bool:
    """Whether the rollout stages its copies for `device` (HostStaging, RolloutBuffer): everywhere but the CPU."""
    return torch.device(device).type != "cpu"


class HostStaging:
    """The rollout's per-step copies between host and device, through one page-locked buffer per name.

    From pageable numpy memory a copy to a GPU is synchronous: the host waits for it, then launches the policy's
    kernels. From page-locked memory it is queued (non_blocking) and the host goes on. Each name keeps its buffer
    (reallocated only when the shape or dtype changes) and an event recorded after the copy it fed, which a write
    to the buffer waits for, so a buffer is never overwritten while a copy reads it. `to_host` is the one wait of
    a rollout step: the env needs the actions. On the CPU, pinning is off and the copies are plain ones (the
    tests run this class there; the trainer only stages for other devices)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._buffers: dict[str, torch.Tensor] = {}
        self._events: dict[str, Any] = {}

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = torch.empty(shape, dtype=dtype, pin_memory=self.cuda)
            self._buffers[name] = buf
        event = self._events.pop(name, None)
        if event is not None:
            event.synchronize()
        return buf

    def to_device(self, name: str, array: np.ndarray) -> torch.Tensor:
        """A new device tensor holding `array`, its copy queued on the current stream."""
        array = np.asarray(array)
        buf = self._buffer(name, array.shape, torch.from_numpy(np.empty(0, array.dtype)).dtype)
        buf.numpy()[...] = array
        out = buf.to(self.device, non_blocking=True, copy=True)
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
            self._events[name] = event
        return out

    def tensors(self, obs: Any) -> Any:
        """A batch of observations (array, dict or tuple of arrays) as device tensors of the same structure."""
        if isinstance(obs, dict):
            return {k: self.to_device(f"obs.{k}", v) for k, v in obs.items()}
        if isinstance(obs, tuple):
            return tuple(self.to_device(f"obs.{i}", v) for i, v in enumerate(obs))
        return self.to_device("obs", obs)

    def to_host(self, name: str, tensor: torch.Tensor) -> np.ndarray:
        """`tensor` on the host, once every queued copy and kernel before it is done (a copy: the buffer is reused)."""
        buf = self._buffer(name, tuple(tensor.shape), tensor.dtype)
        buf.copy_(tensor, non_blocking=self.cuda)
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        return buf.numpy().copy()
