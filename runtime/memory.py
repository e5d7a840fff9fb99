"""How much memory a compress or decompress will take, known before anything is allocated.

Each stage is run once on the meta device (shapes only, no data, a fraction of a second even
for the full-size UNet at 12 Mpixel), under a dispatch mode that adds up the bytes of the tensors
it creates and subtracts them as they are freed: the largest sum is that stage's activation
peak in PyTorch's eager execution, for the exact image size and attention blocking in use.
The estimate of a whole run is what the process already holds, plus weights still to be loaded
(ONNX Runtime creates its sessions on first use), less what ONNX Runtime's arena holds from
earlier runs for this one, plus the largest stage peak times a margin per backend (allocator
slack and kernels' workspaces; measured in benchmarks/memory.py). The codec checks it against the memory the machine has
(or --max-memory) and refuses, naming the image size, the estimate and the way out, instead of
being killed by the kernel half-way.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from osdiff.config import ModelConfig

# Activation peak x margin (eager PyTorch's allocator and kernels' own workspaces; ONNX Runtime's
# arena, one for all sessions, which grows in powers of two: runtime/backends/onnxruntime_backend.py).
# Measured in benchmarks/memory.py, each command a fresh process, demo config: on top of what the
# process held, a PyTorch decompress at 1 MP took 1.41 and 1.62 times the VAE decoder's counted peak
# in two runs; an ONNX Runtime compress 1.79 times the VAE encoder's at 0.5 MP, 1.56 at 1 MP and 1.40
# at 4 MP (the arena's doubling steps weigh most on small images). tests/test_memory.py holds both
# backends under the estimate, and the estimate under twice the peak.
MARGIN = {"torch": 1.75, "onnxruntime": 1.9, "tensorrt": 1.3}
GIB = 1024**3


class MemoryLimitError(ValueError):
    """A run would need more memory than the machine (or --max-memory) allows."""


class _PeakMeter(TorchDispatchMode):
    """Bytes of live tensor storages created inside the mode, and their maximum."""

    def __init__(self, external: set[int]) -> None:
        super().__init__()
        self.external = external  # storages that existed before (weights, inputs)
        self.refs: dict[int, int] = {}  # storage -> live tensors viewing it
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage()._cdata
                if key in self.external:
                    continue
                if key not in self.refs:
                    self.refs[key], self.sizes[key] = 0, t.untyped_storage().nbytes()
                    self.live += self.sizes[key]
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
        return out

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            self.live -= self.sizes.pop(key)
            del self.refs[key]


def activation_peak(module: torch.nn.Module, *shapes: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
    """Peak bytes of the tensors `module` creates on inputs of these shapes (the module must be
    on the meta device)."""
    inputs = [torch.empty(s, dtype=dtype, device="meta") for s in shapes]
    external = {t.untyped_storage()._cdata for t in [*module.parameters(), *module.buffers(), *inputs]}
    meter = _PeakMeter(external)
    with torch.no_grad(), meter:
        out = module(*inputs)
    del out
    return meter.peak + sum(x.untyped_storage().nbytes() for x in inputs)


@lru_cache(maxsize=4)
def _meta_graphs(cfg: ModelConfig) -> dict:
    from osdiff.export.model import build_stages, graphs

    with torch.device("meta"):
        return graphs(cfg, build_stages(cfg, with_text=False))


@lru_cache(maxsize=256)
def graph_peak(cfg: ModelConfig, name: str, height: int, width: int) -> int:
    """Activation peak of graph `name` on one padded height x width image, bytes."""
    from osdiff.export.model import graph_shapes

    g = _meta_graphs(cfg)[name]
    shapes = graph_shapes(cfg, name, 1, height, width)
    return activation_peak(g.module, *(shapes[i] for i in g.inputs))


def run_graphs(cfg: ModelConfig, decode: bool) -> list[str]:
    """The graphs whose peaks bound a compress (decode=False) or decompress: the entropy
    graphs of the last, widest slice stand for all of them."""
    last = len(cfg.lfgcm.slice_ch) - 1
    entropy = ["hyper_synthesis", f"entropy_anchor_{last}", f"entropy_nonanchor_{last}"]
    return entropy + ["synthesis", "denoiser", "vae_decoder"] if decode else ["vae_encoder", "analysis"] + entropy


def weight_bytes(cfg: ModelConfig) -> int:
    """float32 bytes of every stage's weights."""
    graphs = _meta_graphs(cfg)
    modules = {id(g.module): g.module for g in graphs.values()}
    seen: set[int] = set()
    total = 0
    for m in modules.values():
        for p in [*m.parameters(), *m.buffers()]:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * 4
    return total


@dataclass
class Estimate:
    """Peak memory of one run, bytes."""

    what: str  # "compressing a 4000x3000 image", ...
    resident: int  # already held by the process, plus weights still to be loaded
    stage: str  # the stage with the largest peak
    activations: int  # its activation peak, margin included
    peak: int = 0  # the same without the margin

    @property
    def total(self) -> int:
        return self.resident + self.activations


def estimate(cfg: ModelConfig, backend: str, decode: bool, height: int, width: int, what: str,
             vae_tile: int | None, resident: int) -> Estimate:
    """The peak of compressing (decode=False) or decompressing one padded height x width image,
    the VAE in vae_tile x vae_tile tiles when given. resident: bytes the process holds already
    plus the weights the backend has yet to load."""
    peaks = {}
    for g in run_graphs(cfg, decode):
        h, w = (min(vae_tile, height), min(vae_tile, width)) if vae_tile and g.startswith("vae_") else (height, width)
        peaks[g] = graph_peak(cfg, g, h, w)
    stage = max(peaks, key=lambda g: peaks[g])
    # tiles are blended into full-size float32 accumulators (image or latent, and weights)
    blend = 4 * 4 * height * width if vae_tile else 0
    return Estimate(what, resident, stage, int(peaks[stage] * MARGIN.get(backend, 1.5)) + blend, peaks[stage])


def resident(device: torch.device) -> int:
    """Bytes held now where the activations will live: the process (CPU) or the device (CUDA)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else process_rss()


def process_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available_memory() -> int:
    """What this process may still allocate: the kernel's MemAvailable, further bounded by a
    cgroup (container) limit when there is one."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(avail, 0)


def budget(max_memory: int | None, device: torch.device | None = None) -> int:
    """The bytes a whole run may take: --max-memory, else what the process holds plus what
    the machine still has available. On a CUDA device (where the activations live) the
    device's total memory."""
    if max_memory is not None:
        return max_memory
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return process_rss() + available_memory()


def parse_size(text: str) -> int:
    """"6G", "6GB", "512M", "1.5T", "123456" (bytes) -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (examples: 6G, 512M)") from None


def check(est: Estimate, limit: int, remedy: str) -> None:
    if est.total > limit:
        raise MemoryLimitError(
            f"{est.what} needs about {est.total / GIB:.1f} GiB (peak in {est.stage}: {est.activations / GIB:.1f} GiB, "
            f"plus {est.resident / GIB:.1f} GiB of weights and process), more than the {limit / GIB:.1f} GiB allowed "
            f"(free memory or --max-memory); {remedy}"
        )
