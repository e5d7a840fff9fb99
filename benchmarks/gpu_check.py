"""The GPU check: the first hardware numbers from one prepared command, in a few minutes.

Run through benchmarks/gpu_check.sh (which installs the kit offline first); the steps, each in
its own time share and its own process, so that a step that runs out of time is killed without
losing what the others measured:

  1. gpu_tests   the `gpu`-marked tests (tests/test_cuda.py, ...)
  2. ours        full-size random weights, 512x768, batch 1, bytes in to pixels out, synchronized:
                 ours fp32 eager; the re-created reference-style path when no checkout of the
                 original is carried; cross-device determinism (streams of 20 images encoded on
                 the CPU decoded on CUDA and the reverse, symbol by symbol); fp16 + channels_last;
                 + CUDA graphs; fp16 PSNR against fp32 on the same stream; batch-8 decode
                 throughput of the fastest; torch.compile if time remains (compile time apart)
  3. original    the original implementation (benchmarks/original.py), fp32 eager as its
                 inference.py runs, on the same weights and image, when its checkout is carried

Each variant: median of `runs` timed decodes and encodes after `warmup`, per-stage medians (the
spans of runtime/profiling.Trace: CUDA events on a GPU), peak GPU memory of decode and of
encode. Writes OUTDIR/gpu_check.json (rewritten as results arrive, so a partial run leaves a
partial JSON), OUTDIR/gpu_check.png (per-stage bars) and OUTDIR/gpu_tests.log, and prints a
summary table.

OSDIFF_GPU_CHECK_DEVICE=cpu rehearses it on a CPU: the demo config at 128x192, fewer runs,
the same JSON layout; variants that need CUDA are reported as skipped with the reason. CI runs
the rehearsal (tests/test_gpu_check.py).

    python benchmarks/gpu_check.py OUTDIR          (normally: benchmarks/gpu_check.sh OUTDIR)
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from entropy import cpu_model  # noqa: E402
from pipeline import ReferenceStyleCodec, chart  # noqa: E402

from osdiff.config import ModelConfig  # noqa: E402
from osdiff.export.model import OSDiffModel  # noqa: E402
from osdiff.files import psnr, read_image  # noqa: E402
from osdiff.runtime.backends.torch_backend import TorchBackend  # noqa: E402
from osdiff.runtime.codec import Codec  # noqa: E402
from osdiff.runtime.latent_codec import compress_latent, decompress_latent  # noqa: E402
from osdiff.runtime.profiling import Trace, per_stage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KIT = Path(os.environ.get("OSDIFF_GPU_KIT", REPO / ".gpu-kit"))
TARGETS = {"decode_ms": 20.0, "encode_ms": 25.0, "speedup": 10.0, "peak_decode_mb": 3072.0, "fp16_psnr_db": 40.0}


@dataclass
class Plan:
    """What a run measures and how long each step may take (seconds of wall time)."""

    device: str
    config: str
    height: int
    width: int
    runs: int
    warmup: int
    batch: int
    cross_images: int
    budget: dict[str, float]
    compile_mode: str = "default"

    @staticmethod
    def for_device(device: str) -> "Plan":
        """The plan for a device; OSDIFF_GPU_CHECK_PLAN (JSON) overrides fields, e.g.
        '{"config": "full", "height": 128, "width": 192, "budget": {"gpu_tests": 60, "ours": 1800,
        "original": 1800}}' to compare with the original on a CPU at full size."""
        if device == "cpu":  # the rehearsal: every code path, small and quick
            plan = Plan("cpu", "demo", 128, 192, runs=3, warmup=1, batch=2, cross_images=4,
                        budget={"gpu_tests": 60, "ours": 120, "original": 90})
        else:  # 8 minutes in all: the lent GPU machine's 15 minutes include its start and the install
            plan = Plan(device, "full", 512, 768, runs=10, warmup=3, batch=8, cross_images=20,
                        budget={"gpu_tests": 100, "ours": 250, "original": 110})
        return Plan(**{**asdict(plan), **json.loads(os.environ.get("OSDIFF_GPU_CHECK_PLAN", "{}"))})


def original_checkout(config: str | None = None) -> Path | None:
    """The carried checkout of the original implementation, if it can run here (and run
    `config`, when given)."""
    return None if why_no_original(config) else Path(os.environ.get("OSDIFF_ORIGINAL", KIT / "OSDiff"))


def why_no_original(config: str | None = None) -> str | None:
    """Why the original implementation cannot run here (or cannot run `config`), or None."""
    path = Path(os.environ.get("OSDIFF_ORIGINAL", KIT / "OSDiff"))
    if not (path / "model" / "osdiff.py").is_file():
        return f"no checkout of the original implementation at {path} (make gpu-kit puts one in .gpu-kit/OSDiff)"
    missing = [m for m in ("omegaconf", "open_clip", "compressai") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed (gpu_check.sh installs them from the kit's wheels)"
    # its inference.py draws the noise at height // 8 x width // 8: SD's VAE, whatever the model's
    if config is not None and (n := ModelConfig.named(config).latent_downsample) != 8:
        return (f"the original's inference.py assumes a VAE that downsamples 8x (noise of height/8 x width/8); "
                f"the {config} config's downsamples {n}x")
    return None


# ---------------------------------------------------------------------------------------------
# Measuring one codec
# ---------------------------------------------------------------------------------------------


def test_image(plan: Plan, i: int = 0) -> np.ndarray:
    """The bundled demo picture at the plan's size; i > 0: other crops and mirrorings of it."""
    src = Image.fromarray(read_image(REPO / "osdiff" / "assets" / "demo.png"))
    if i:
        w, h = src.size
        f = 0.6 + 0.4 * ((i * 37) % 11) / 10
        left, top = int((w - w * f) * ((i * 13) % 7) / 6), int((h - h * f) * ((i * 29) % 5) / 4)
        src = src.crop((left, top, left + int(w * f), top + int(h * f)))
        if i % 2:
            src = src.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(src.convert("RGB").resize((plan.width, plan.height), Image.BICUBIC))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def timed_runs(fn: Any, device: torch.device, runs: int) -> tuple[list[float], list[dict[str, float]], Any]:
    """(total ms per run, stage ms per run, last result); fn(trace) does one run."""
    totals, stages, out = [], [], None
    for _ in range(runs):
        trace = Trace(device)
        sync(device)
        t0 = time.perf_counter()
        out = fn(trace)
        sync(device)
        totals.append((time.perf_counter() - t0) * 1e3)
        stages.append(per_stage(trace.spans()))
    return totals, stages, out


def median_stages(per_run: list[dict[str, float]], totals: list[float]) -> dict[str, float]:
    """Median ms per stage, plus what no span covers ("other")."""
    names = list(dict.fromkeys(k for r in per_run for k in r))
    med = {n: statistics.median(r.get(n, 0.0) for r in per_run) for n in names}
    med["other"] = max(0.0, statistics.median(totals) - sum(med.values()))
    return med


def measure(codec: Any, images: list[np.ndarray], plan: Plan) -> tuple[dict[str, Any], list[bytes]]:
    """Encode and decode `images` (one batch) with a codec that has compress_batch /
    decompress_batch and backend.device: warm-up, then `plan.runs` timed decodes, then as many
    timed encodes, each with its peak device memory."""
    device = codec.backend.device
    streams = codec.compress_batch(images)
    for _ in range(plan.warmup):
        codec.decompress_batch(codec.compress_batch(images))
    reset_peak(device)
    dec, dec_stages, _ = timed_runs(lambda t: codec.decompress_batch(streams, trace=t), device, plan.runs)
    dec_peak = peak_mb(device)
    reset_peak(device)
    enc, enc_stages, streams = timed_runs(lambda t: codec.compress_batch(images, trace=t), device, plan.runs)
    n_bytes = int(np.mean([len(s) for s in streams]))
    return {
        "status": "measured", "batch": len(images), "runs": plan.runs, "warmup": plan.warmup,
        "decode_ms": statistics.median(dec), "decode_p90_ms": float(np.percentile(dec, 90)), "decode_min_ms": min(dec),
        "encode_ms": statistics.median(enc), "encode_p90_ms": float(np.percentile(enc, 90)), "encode_min_ms": min(enc),
        "peak_mem_mb": dec_peak, "peak_mem_encode_mb": peak_mb(device),
        "stages": median_stages(dec_stages, dec), "encode_stages": median_stages(enc_stages, enc),
        "stream_bytes": n_bytes, "bpp": n_bytes * 8 / (images[0].shape[0] * images[0].shape[1]),
    }, streams


def skipped(name: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "status": "skipped", "reason": reason, "decode_ms": None, "encode_ms": None,
            "peak_mem_mb": None, "stages": {}, **extra}


# ---------------------------------------------------------------------------------------------
# Steps (each runs in its own process: `gpu_check.py --step NAME OUTDIR WORKDIR DEADLINE`)
# ---------------------------------------------------------------------------------------------


class Partial:
    """A step's results, rewritten atomically after every addition (the parent reads them,
    also after killing the step)."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {"variants": []}

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def variant(self, result: dict[str, Any]) -> None:
        self.data["variants"] = [v for v in self.data["variants"] if v["name"] != result["name"]] + [result]
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=float))
        tmp.replace(self.path)


def step_ours(plan: Plan, work: Path, deadline: float) -> None:
    out = Partial(work / "ours.json")
    device = torch.device(plan.device)
    left = lambda: deadline - time.time()  # noqa: E731
    cuda = device.type == "cuda"
    no_cuda = "needs CUDA (fp16, channels_last, CUDA graphs and torch.compile are offered on CUDA only)"

    t0 = time.time()
    cfg = ModelConfig.named(plan.config)
    model = OSDiffModel.random(cfg, seed=0)
    out.set("model_build_s", time.time() - t0)
    if original_checkout(plan.config) is not None:  # the original step loads these instead of building them again
        from safetensors.torch import save_file

        from original import checkpoint_state_dict

        save_file({k: v.contiguous() for k, v in checkpoint_state_dict(model).items()}, str(work / "weights.safetensors"))
    image = test_image(plan)

    # ours fp32 eager; its stream and image are the reference for the fp16 PSNR
    fp32 = Codec(TorchBackend(model, device))
    measured(out, "ours fp32 eager", lambda: measure(fp32, [image], plan)[0], must=True)
    stream = fp32.compress(image)
    fp32_image = fp32.decompress(stream)
    (work / "ours_reference_stream.bin").write_bytes(fp32.compress_reference(image))
    fastest: tuple[Any, str] = (fp32, "ours fp32 eager")

    if original_checkout(plan.config) is None:
        note = "no checkout of the original implementation: our stages with the reference's entropy loop " \
               "(benchmarks/pipeline.py), not the original's code"
        measured(out, "reference-style (re-created, fp32 eager)",
                 lambda: {**measure(ReferenceStyleCodec(TorchBackend(model, device)), [image], plan)[0], "note": note})

    attempt(out, "cross_device", lambda: cross_device(model, fp32, plan, left))
    if not cuda:  # the rehearsal runs the query-block comparison on the CPU variant
        measured(out, f"ours fp32 eager{BLOCKS}", lambda: with_query_blocks(lambda: Codec(TorchBackend(model, device)),
                                                                          image, plan))

    names = ("ours fp16 + channels_last", "ours fp16 + channels_last + CUDA graphs",
             "ours fp16 + channels_last + CUDA graphs + torch.compile")
    if not cuda:
        for name in names:
            out.variant(skipped(name, no_cuda))
        out.set("fp16_psnr", {"status": "skipped", "reason": no_cuda})
    else:
        del fp32, fastest
        fp16 = Codec(TorchBackend(model, device, half=True, channels_last=True))
        measured(out, names[0], lambda: measure(fp16, [image], plan)[0])
        fastest = (fp16, names[0])
        graphs = Codec(TorchBackend(model, device, half=True, channels_last=True, cuda_graphs=True))
        if measured(out, names[1], lambda: measure(graphs, [image], plan)[0]):
            fastest = (graphs, names[1])
        measured(out, names[1] + BLOCKS, lambda: with_query_blocks(
            lambda: Codec(TorchBackend(model, device, half=True, channels_last=True, cuda_graphs=True)), image, plan))

        def fp16_psnr() -> dict[str, Any]:
            codec, name = fastest
            fp16_image = codec.decompress(stream)
            return {"status": "measured", "variant": name, "db": psnr(fp16_image, fp32_image),
                    "repeat_identical": bool(np.array_equal(fp16_image, codec.decompress(stream)))}

        attempt(out, "fp16_psnr", fp16_psnr)

    def throughput() -> dict[str, Any]:
        codec, name = fastest
        images = [test_image(plan, i) for i in range(plan.batch)]
        t = measure(codec, images, Plan(**{**asdict(plan), "runs": max(3, plan.runs // 2), "warmup": 2}))[0]
        return {"status": "measured", "variant": name, "batch": plan.batch,
                "images_per_s": plan.batch / t["decode_ms"] * 1e3, "decode_ms_per_batch": t["decode_ms"],
                "encode_images_per_s": plan.batch / t["encode_ms"] * 1e3, "peak_mem_mb": t["peak_mem_mb"]}

    attempt(out, "throughput", throughput, variant=fastest[1])

    if cuda:
        if left() < 60:
            out.variant(skipped(names[2], f"time share used up ({left():.0f} s left, compiling needs more)"))
            return

        def compiled() -> dict[str, Any]:
            codec = Codec(TorchBackend(model, device, half=True, channels_last=True, cuda_graphs=True, compile=True,
                                       compile_mode=plan.compile_mode))
            t0 = time.time()
            codec.decompress(codec.compress(image))  # compiles every heavy stage once
            compile_s = time.time() - t0
            return {**measure(codec, [image], plan)[0], "compile_s": compile_s, "compile_mode": plan.compile_mode}

        out.variant({"name": names[2], "status": "running (compiling)", "compile_mode": plan.compile_mode})
        measured(out, names[2], compiled, status="running (compiling)")


# Issue 26's comparison: every attention split into query blocks, as before it ran as one SDPA
# call wherever SDPA's kernel is memory-linear (export/models/attention.py)
BLOCKS = ", attention in query blocks (before)"


def with_query_blocks(make_codec: Any, image: np.ndarray, plan: Plan) -> dict[str, Any]:
    """A variant measured with attention forced into query blocks (CUDA graphs, if any, are
    captured inside, so they hold the blocks too)."""
    from osdiff.export.models.attention import always_query_blocks

    with always_query_blocks():
        return {**measure(make_codec(), [image], plan)[0], "note": "comparison only: not what the engine runs"}


def measured(out: Partial, name: str, fn: Any, must: bool = False, status: str = "running") -> bool:
    """One variant: marked running, then its results, or why it failed (one variant failing
    must not cost the others; `must`: the step cannot go on without it)."""
    out.variant({"name": name, "status": status})
    try:
        out.variant({"name": name, **fn()})
        return True
    except Exception as e:
        if must:
            raise
        traceback.print_exc()
        out.variant({**skipped(name, f"{type(e).__name__}: {e}"[:1000]), "status": "failed"})
        return False


def attempt(out: Partial, key: str, fn: Any, **running: Any) -> None:
    """One non-variant result (cross_device, fp16_psnr, throughput), likewise."""
    out.set(key, {"status": "running", **running})
    try:
        out.set(key, fn())
    except Exception as e:
        traceback.print_exc()
        out.set(key, {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:1000], **running})


def cross_device(model: OSDiffModel, codec: Codec, plan: Plan, left: Any) -> dict[str, Any]:
    """Streams encoded on the CPU decoded on `codec`'s device and the reverse: how many decode to
    exactly the encoder's symbols. Only the entropy model decides that, so only the latent is
    coded (the heavy stages would cost minutes on the CPU): y and z of each image come from the
    device's VAE encoder and G_a; the CPU side runs copies of the entropy-model graphs."""
    device = codec.backend.device
    cpu = TorchBackend(_entropy_model_copy(model))
    m, cfg = model, model.config
    n = plan.cross_images
    exact = {"cpu_to_device": 0, "device_to_cpu": 0}
    done = both = 0
    t0 = time.time()
    for i in range(n):
        if left() < 20:
            break
        image = test_image(plan, i + 1)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255).to(device)
        (y0,) = codec.backend.run("vae_encoder", x)
        y, z = codec.backend.run("analysis", y0)
        ok = []
        for key, enc, dec in (("cpu_to_device", cpu, codec.backend), ("device_to_cpu", codec.backend, cpu)):
            coded, _ = compress_latent(enc, cfg, m.entropy_bottleneck, m.gaussian, y.to(enc.device), z.to(enc.device))
            sent = copy.copy(coded)
            sent.symbols = []
            try:
                decompress_latent(dec, cfg, m.entropy_bottleneck, m.gaussian, sent)
            except ValueError:  # the coder hit an impossible value: certainly not exact
                sent.symbols = []
            ok.append(len(coded.symbols) == len(sent.symbols) and all(
                np.array_equal(a.reshape(-1), b.reshape(-1)) for a, b in zip(coded.symbols, sent.symbols)))
            exact[key] += ok[-1]
        both += all(ok)
        done += 1
    return {"status": "measured" if done == n else f"time share used up after {done} of {n} images",
            "images": done, "symbol_exact": both, **exact,
            "devices": ["cpu", str(device)], "config": cfg.name, "size": [plan.height, plan.width],
            "seconds": time.time() - t0,
            "what": "symbol_exact: images whose streams decode to exactly the encoder's symbols both ways "
                    "(coded on the CPU, decoded on the device, and the reverse)"}


def _entropy_model_copy(model: OSDiffModel) -> OSDiffModel:
    """An OSDiffModel on the CPU with copies of the entropy-model stages only (the others are
    placeholders that are never run): enough for compress_latent / decompress_latent."""
    keep = ("analysis", "hyper_synthesis", "entropy_parameters")
    stages = {k: (copy.deepcopy(v).cpu() if k in keep else torch.nn.Identity()) for k, v in model.stages.items()}
    return OSDiffModel(model.config, stages, model.entropy_bottleneck, model.gaussian, model.weights_id)


def step_original(plan: Plan, work: Path, deadline: float) -> None:
    import original as orig

    out = Partial(work / "original.json")
    name = "original (fp32 eager, its inference.py)"
    checkout = original_checkout(plan.config)
    assert checkout is not None
    out.variant({"name": name, "status": "running (building)"})
    cfg = ModelConfig.named(plan.config)
    t0 = time.time()
    weights = work / "weights.safetensors"
    if weights.exists():
        from safetensors.torch import load_file

        model = orig.build(checkout, cfg, plan.device, state_dict=load_file(str(weights)))
    else:
        model = orig.build(checkout, cfg, plan.device, weights=OSDiffModel.random(cfg, seed=0))
    build_s = time.time() - t0
    codec = orig.OriginalCodec(checkout, model, workdir=work)
    image = test_image(plan)
    out.variant({"name": name, "status": "running"})
    result, streams = measure(codec, [image], plan)
    ours = work / "ours_reference_stream.bin"
    same = (streams[0] == ours.read_bytes()) if ours.exists() else None
    # its whole process() (encode + decode in one call), to cross-check the split
    t0 = time.time()
    sync(codec.device)
    codec.process(image)
    sync(codec.device)
    out.variant({"name": name, **result, "build_s": build_s, "process_ms": (time.time() - t0) * 1e3,
                 "same_stream_as_ours": same, "checkout": str(checkout),
                 "note": "text encoder run per image, as its process() does; OpenCLIP with random weights"})


# ---------------------------------------------------------------------------------------------
# The parent: steps in their time shares, results merged into one JSON
# ---------------------------------------------------------------------------------------------


def run_step(argv: list[str], budget: float, on_tick: Any, log: Path | None = None) -> tuple[int | None, float]:
    """Run a child process for at most `budget` s, calling on_tick() every few seconds; kill its
    whole process group when the time is up. Returns (exit code or None if killed, seconds)."""
    t0 = time.time()
    stdout = open(log, "w") if log else None
    proc = subprocess.Popen(argv, cwd=REPO, start_new_session=True, stdout=stdout, stderr=subprocess.STDOUT if log else None)
    try:
        while True:
            try:
                return proc.wait(timeout=5), time.time() - t0
            except subprocess.TimeoutExpired:
                on_tick()
                if time.time() - t0 > budget:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return None, time.time() - t0
    finally:
        if stdout:
            stdout.close()


def gpu_test_files() -> list[str]:
    """The test files with `gpu`-marked tests; tests/test_cuda.py last: its ONNX export and two
    full-size models take minutes (its fp16-vs-fp32 PSNR is measured by the ours step too)."""
    files = [str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "pytest.mark.gpu" in p.read_text()]
    return sorted(files, key=lambda f: (f == "tests/test_cuda.py", f))


def parse_pytest(log: str) -> dict[str, Any]:
    tests = dict(re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", log, re.M))
    skips = re.findall(r"^SKIPPED \[\d+\] (.+)$", log, re.M)
    counts = {k: sum(1 for v in tests.values() if v == k.upper()) for k in ("passed", "failed", "skipped", "error")}
    return {**counts, "tests": tests, "skip_reasons": sorted(set(skips))}


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                            "cpu": cpu_model(), "cores": os.cpu_count()}
    if device == "cpu" or not torch.cuda.is_available():
        return {"name": cpu_model(), "driver": None, **info, "cuda_available": torch.cuda.is_available()}
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = None
    return {"name": props.name, "driver": driver, **info, "cudnn": torch.backends.cudnn.version(),
            "compute_capability": f"{props.major}.{props.minor}", "memory_mb": props.total_memory / 2**20,
            "multiprocessors": props.multi_processor_count}


def assemble(plan: Plan, work: Path, steps: dict[str, Any], started: float, device: dict[str, Any]) -> dict[str, Any]:
    """The one JSON, from what every step wrote so far."""
    ours = _read(work / "ours.json")
    orig = _read(work / "original.json")
    checkout = original_checkout(plan.config)
    variants = []
    if checkout is None:
        variants.append(skipped("original (fp32 eager, its inference.py)", str(why_no_original(plan.config))))
    else:
        variants += orig.get("variants") or [skipped("original (fp32 eager, its inference.py)", "not run yet")]
    variants += ours.get("variants", [])
    for v in variants + [ours.get(k, {}) for k in ("throughput", "fp16_psnr", "cross_device")]:
        if v.get("status", "").startswith("running"):  # its step ended before it did
            step = "original" if v.get("name", "").startswith("original") else "ours"
            if steps.get(step, {}).get("status") not in (None, "running"):
                v["status"] = f"killed while {v['status'][len('running'):].strip(' ()') or 'running'}: {steps[step]['status']}"
    base = next((v for v in variants if v.get("status") == "measured" and not v["name"].startswith("ours")), None)
    for v in variants:
        if base and v.get("status") == "measured":
            v["speedup_vs_baseline"] = {"baseline": base["name"], "decode": base["decode_ms"] / v["decode_ms"],
                                        "encode": base["encode_ms"] / v["encode_ms"]}
    psnr_result = ours.get("fp16_psnr", {"status": "not run"})
    result = {
        "kit": {"mode": "rehearsal (cpu)" if plan.device == "cpu" else "gpu", "plan": asdict(plan),
                "original_checkout": str(checkout) if checkout else None, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                "wall_s": time.time() - started, "command": " ".join(sys.argv)},
        "device": device,
        "steps": steps,
        "variants": variants,
        "throughput": ours.get("throughput", {"status": "not run"}),
        "fp16_psnr_db": psnr_result.get("db"),
        "fp16_psnr": psnr_result,
        "cross_device": ours.get("cross_device", {"status": "not run", "images": 0, "symbol_exact": 0}),
        "model_build_s": ours.get("model_build_s"),
    }
    result["targets"] = targets(result, plan)
    return result


def targets(r: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The mission's GPU targets (H200, 512x768, fp16) against the best fp16 variant measured."""
    fp16 = [v for v in r["variants"] if v.get("status") == "measured" and "fp16" in v["name"] and BLOCKS not in v["name"]]
    best = min(fp16, key=lambda v: v["decode_ms"], default=None)
    base = next((v for v in r["variants"] if v.get("status") == "measured" and not v["name"].startswith("ours")), None)
    value = {
        "decode_ms": best and best["decode_ms"], "encode_ms": best and min(v["encode_ms"] for v in fp16),
        "speedup": best and base and base["decode_ms"] / best["decode_ms"],
        "peak_decode_mb": best and best["peak_mem_mb"], "fp16_psnr_db": r["fp16_psnr_db"],
    }
    applies = plan.device != "cpu" and (plan.height, plan.width) == (512, 768) and plan.config == "full"
    out = {}
    for key, limit in TARGETS.items():
        v = value[key]
        met = None if v is None or not applies else (v >= limit if key in ("speedup", "fp16_psnr_db") else v <= limit)
        out[key] = {"target": (">= " if key in ("speedup", "fp16_psnr_db") else "<= ") + str(limit), "value": v, "met": met}
    out["variant"] = best["name"] if best else None
    out["baseline"] = base["name"] if base else None
    if not applies:
        out["note"] = "the targets are for the full model at 512x768 on the H200 in fp16: not applicable to this run"
    return out


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write(outdir: Path, result: dict[str, Any]) -> None:
    tmp = outdir / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
    tmp.replace(outdir / "gpu_check.json")
    done = [v for v in result["variants"] if v.get("status") == "measured"]
    if done:
        dec = chart({v["name"]: v["stages"] for v in done},
                    f"decode, {result['device']['name']}: median ms per stage (batch 1; lower is better)")
        enc = chart({v["name"]: v["encode_stages"] for v in done}, "encode: median ms per stage")
        im = Image.new("RGB", (max(dec.width, enc.width), dec.height + enc.height), "white")
        im.paste(dec, (0, 0))
        im.paste(enc, (0, dec.height))
        im.save(outdir / "gpu_check.png")


def summary(r: dict[str, Any]) -> str:
    p = r["kit"]["plan"]
    lines = [f"GPU check ({r['kit']['mode']}): {p['config']} model, random weights, {p['height']}x{p['width']}, "
             f"batch 1, median of {p['runs']} after {p['warmup']} warm-up; {r['device']['name']}, torch {r['device']['torch']}"
             f", CUDA {r['device']['cuda']}, driver {r['device']['driver']}",
             f"{'variant':<80}{'decode ms':>10}{'encode ms':>10}{'peak MB':>9}{'x dec':>7}  status"]
    fmt = lambda v, f: f"{v:{f}}" if isinstance(v, (int, float)) else f"{'-':>{f.split('.')[0]}}"  # noqa: E731
    for v in r["variants"]:
        x = v.get("speedup_vs_baseline", {}).get("decode")
        extra = f" (compile {v['compile_s']:.0f} s)" if v.get("compile_s") else ""
        lines.append(f"{v['name']:<80}{fmt(v.get('decode_ms'), '10.1f')}{fmt(v.get('encode_ms'), '10.1f')}"
                     f"{fmt(v.get('peak_mem_mb'), '9.0f')}{fmt(x, '7.2f')}  {v.get('status')}{extra}"
                     + (f": {v['reason']}" if v.get("reason") else ""))
    t = r["throughput"]
    lines.append(f"batch {t.get('batch', '-')} decode throughput ({t.get('variant', '-')}): "
                 + (f"{t['images_per_s']:.1f} images/s" if t.get("images_per_s") else str(t.get("status"))))
    f = r["fp16_psnr"]
    lines.append("fp16 vs fp32 PSNR on one stream: " + (f"{f['db']:.2f} dB (repeat decode identical: {f['repeat_identical']})"
                                                       if f.get("db") is not None else f"{f.get('status')}: {f.get('reason', '')}"))
    c = r["cross_device"]
    lines.append(f"cross-device ({' <-> '.join(c.get('devices', []))}, {c.get('config')}): {c.get('symbol_exact')} of "
                 f"{c.get('images')} images symbol-exact both ways (cpu->device {c.get('cpu_to_device')}, "
                 f"device->cpu {c.get('device_to_cpu')}); {c.get('status')}")
    g = r["steps"].get("gpu_tests", {})
    lines.append(f"gpu tests: {g.get('passed', 0)} passed, {g.get('failed', 0)} failed, {g.get('skipped', 0)} skipped, "
                 f"{g.get('error', 0)} errors; {g.get('status')}")
    tg = r["targets"]
    lines.append("targets (" + (tg.get("note") or f"best fp16 variant: {tg['variant']}; baseline: {tg['baseline']}") + "):")
    for key in TARGETS:
        e = tg[key]
        lines.append(f"  {key:<16}{e['target']:>10}  value {fmt(e['value'], '.2f')}  met {e['met']}")
    lines.append("steps: " + ", ".join(f"{k} {v['status']} ({v['seconds']:.0f} s of {v['budget_s']:.0f})"
                                       for k, v in r["steps"].items() if "seconds" in v))
    return "\n".join(lines)


def main(outdir: Path) -> None:
    started = time.time()
    device = os.environ.get("OSDIFF_GPU_CHECK_DEVICE", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run the rehearsal with OSDIFF_GPU_CHECK_DEVICE=cpu")
    plan = Plan.for_device(device)
    outdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="osdiff-gpu-check-"))  # partial results, weights: not for $OUT
    info = device_info(device)
    steps: dict[str, Any] = {}
    update = lambda: write(outdir, assemble(plan, work, steps, started, info))  # noqa: E731

    env_ref = KIT / "reference"
    files = gpu_test_files()
    steps["gpu_tests"] = {"status": "running", "budget_s": plan.budget["gpu_tests"], "files": files}
    log = outdir / "gpu_tests.log"
    env = {**os.environ, **({"OSDIFF_REFERENCE": str(env_ref)} if (env_ref / "tiny").is_dir() and "OSDIFF_REFERENCE" not in os.environ else {})}
    os.environ.update(env)
    code, secs = run_step([sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rA", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", *files], plan.budget["gpu_tests"], update, log)
    steps["gpu_tests"].update(status="done" if code is not None else "timed out", exit_code=code, seconds=secs,
                              **parse_pytest(log.read_text(errors="replace")))
    update()

    for name in ("ours", "original"):
        if name == "original" and original_checkout(plan.config) is None:
            continue
        steps[name] = {"status": "running", "budget_s": plan.budget[name]}
        deadline = time.time() + plan.budget[name] - 5
        code, secs = run_step([sys.executable, __file__, "--step", name, str(outdir), str(work), str(deadline)],
                              plan.budget[name], update)
        status = "done" if code == 0 else ("timed out" if code is None else f"failed (exit code {code})")
        steps[name].update(status=status, seconds=secs)
        update()
    result = assemble(plan, work, steps, started, info)
    write(outdir, result)
    print(summary(result))
    print(f"\nwrote {outdir / 'gpu_check.json'}, {outdir / 'gpu_check.png'}, {outdir / 'gpu_tests.log'}")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--step":
        _, _, step, out_dir, work_dir, deadline_s = sys.argv
        step_plan = Plan.for_device(os.environ.get("OSDIFF_GPU_CHECK_DEVICE", "cuda"))
        {"ours": step_ours, "original": step_original}[step](step_plan, Path(work_dir), float(deadline_s))
    elif len(sys.argv) == 2 and not sys.argv[1].startswith("-"):
        main(Path(sys.argv[1]))
    else:
        raise SystemExit("usage: python benchmarks/gpu_check.py OUTDIR   (OSDIFF_GPU_CHECK_DEVICE=cpu: the rehearsal)")
