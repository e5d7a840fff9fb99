"""Post-training quantization of one graph with NVIDIA TensorRT Model Optimizer (ModelOpt,
`modelopt.torch.quantization`), following its recipe for diffusion backbones:

- INT8: weights per output channel, activations per tensor; the activation ranges from a
  histogram of the calibration activations (a percentile of |x|, or the entropy calibrator's
  KL-optimal clip), the Linear layers smoothed first with SmoothQuant (per-channel scales
  moved from the activations into the weights, alpha 0.8, as ModelOpt's diffusion example).
- FP8 (E4M3): weights and activations per tensor, amax = the largest |x| seen (ModelOpt's FP8
  default; E4M3's floating grid needs no clipping search).

Only Conv2d, ConvTranspose2d and Linear layers get quantizers (on their input and weight):
GroupNorm, SiLU/GELU, the attention matmuls and softmax stay float, as TensorRT's and ONNX
Runtime's fused INT8 kernels expect. INT8 Conv2d layers also quantize their output (per tensor,
calibrated as the inputs are): ONNX Runtime's CPU provider runs DQ -> Conv as an integer
convolution (QLinearConv) only when a QuantizeLinear follows it, and otherwise computes the
convolution in float behind the DequantizeLinear; its Linear layers need no output Q (DQ -> MatMul
becomes MatMulIntegerToFloat). TensorRT fuses the output Q into the convolution too, so one graph
serves both. `skip` names layers that keep float weights, inputs and outputs.

INT8 residual blocks of the LFGCM (ResidualBottleneck: x + branch(x)) add their input as their
first convolution reads it, quantized (`Recipe.quantized_residuals`): both inputs of the sum are
then dequantized 8-bit tensors and its output goes to the next block's input quantizer, so ONNX
Runtime adds in 8 bits (QLinearAdd) where it otherwise dequantized twice and added in float, and
TensorRT can fuse the sum into the convolution (its documented placement of a residual's Q/DQ).
Measured on the full-size G_s (random weights, 512x768, ONNX Runtime 1.31 CPU, Intel Xeon with
AVX-512 VNNI): INT8 37.8 -> 30.5 ms with GELU as one node. What it costs in quality is in what
calibration measures (the skip carries the rounding of the block's input, half a step at most).

A "block" is the unit of the sensitivity analysis (calibration/calibrate.py): a ResBlock or
transformer of the UNet (one element of input_blocks/output_blocks/middle_block), a VAE
ResnetBlock, up/downsampler or mid-block part, or a single layer (stems, zero convs). See
`block_of`.

modelopt is an optional extra (`pip install -e ".[calibrate]"`), imported inside functions.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from osdiff.export.models.lfgcm import ResidualBottleneck

LAYER_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
PRECISIONS = ("int8", "fp8")
CALIBRATORS = ("percentile", "entropy", "max")


class CalibrationUnavailable(ValueError):
    """nvidia-modelopt is not installed."""


@dataclass(frozen=True)
class Recipe:
    """How one precision is calibrated. smoothquant_alpha: None turns SmoothQuant off;
    percentile: of |activation|, for calibrator "percentile"; quantized_residuals: see the module
    docstring (INT8 only)."""

    precision: str = "int8"
    calibrator: str = "percentile"
    percentile: float = 99.999
    smoothquant_alpha: float | None = 0.8
    # quantize the outputs of the Conv2d layers too (INT8 only; see the module docstring)
    conv_outputs: bool = True
    quantized_residuals: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.calibrator not in CALIBRATORS:
            raise ValueError(f"calibrator must be one of {CALIBRATORS}, not {self.calibrator!r}")
        if self.precision == "fp8" and (self.calibrator != "max" or self.smoothquant_alpha is not None
                                        or self.conv_outputs or self.quantized_residuals):
            raise ValueError("FP8 is calibrated with max, without SmoothQuant, output quantizers or quantized "
                             "residuals (Recipe.fp8())")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], not {self.percentile}")

    @staticmethod
    def fp8() -> "Recipe":
        return Recipe("fp8", "max", 100.0, None, conv_outputs=False, quantized_residuals=False)

    def describe(self) -> dict:
        return asdict(self)


def modelopt_version() -> str:
    """ModelOpt's version; imports its quantization package (once per process). Raises
    CalibrationUnavailable without it."""
    try:
        import modelopt
        with warnings.catch_warnings():
            # its Hugging Face export, which nothing here uses, warns at import without transformers
            warnings.filterwarnings("ignore", message="Cannot find transformers package")
            import modelopt.torch.quantization  # noqa: F401
    except ImportError as e:
        raise CalibrationUnavailable("calibration needs NVIDIA's ModelOpt: pip install -e \".[calibrate]\" "
                                     "(nvidia-modelopt)") from e
    return str(modelopt.__version__)


def quantizable_layers(module: nn.Module) -> list[str]:
    """Names of the layers that can take quantizers, in module order."""
    return [n for n, m in module.named_modules() if isinstance(m, LAYER_TYPES)]


def block_of(layer: str) -> str:
    """The block a layer belongs to (see the module docstring):

        unet.input_blocks.1.0.in_layers.2             -> unet.input_blocks.1
        unet.middle_block.1.transformer_blocks.0.ff.net.2 -> unet.middle_block.1
        decoder.up.1.block.0.conv1                    -> decoder.up.1.block.0
        decoder.up.1.upsample.conv                    -> decoder.up.1.upsample
        decoder.mid.attn_1.q                          -> decoder.mid.attn_1
        unet.time_embed.0                             -> unet.time_embed
        decoder.conv_in                               -> decoder.conv_in
    """
    parts = layer.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            rest = parts[i + 1: -1]
            if rest[:1] == ["block"] and len(rest) >= 2:  # a VAE level's ResnetBlock
                return ".".join(parts[: i + 3])
            if rest in (["upsample"], ["downsample"]):
                return ".".join(parts[: i + 2])
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 2 else layer


def blocks(module: nn.Module) -> dict[str, list[str]]:
    """block -> its quantizable layers, in module order."""
    out: dict[str, list[str]] = {}
    for layer in quantizable_layers(module):
        out.setdefault(block_of(layer), []).append(layer)
    return out


def modelopt_config(recipe: Recipe, skip: Iterable[str] = ()) -> dict:
    """The ModelOpt quantization config: quantizers on the inputs and weights of the layer
    types (and the Conv2d outputs where the recipe says), none on the layers in `skip` (exact
    layer names)."""
    if recipe.precision == "int8":
        weight: dict = {"num_bits": 8, "axis": 0}
        act: dict = {"num_bits": 8, "axis": None}
    else:
        weight = {"num_bits": (4, 3), "axis": None}
        act = {"num_bits": (4, 3), "axis": None}
    quant_cfg: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for cls in ("nn.Conv2d", "nn.Linear", "nn.ConvTranspose2d"):
        # a transposed conv's weight is in x out x k x k: its output channels are axis 1
        w = {**weight, "axis": 1} if cls == "nn.ConvTranspose2d" and weight["axis"] == 0 else weight
        quant_cfg.append({"quantizer_name": "*weight_quantizer", "parent_class": cls, "cfg": w})
        quant_cfg.append({"quantizer_name": "*input_quantizer", "parent_class": cls, "cfg": act})
    if recipe.conv_outputs:
        quant_cfg.append({"quantizer_name": "*output_quantizer", "parent_class": "nn.Conv2d", "cfg": act})
    for layer in skip:
        quant_cfg.append({"quantizer_name": f"{layer}.*", "enable": False})
    if recipe.smoothquant_alpha is not None:
        algorithm: dict | str = {"method": "smoothquant", "alpha": recipe.smoothquant_alpha}
    else:
        algorithm = "max"
    return {"quant_cfg": quant_cfg, "algorithm": algorithm}


Inputs = list[tuple[Tensor, ...]]


def forward_loop(inputs: Inputs) -> Callable[[nn.Module], None]:
    def loop(module: nn.Module) -> None:
        with torch.no_grad():
            for args in inputs:
                module(*args)
    return loop


def quantize(module: nn.Module, inputs: Inputs, recipe: Recipe, skip: Iterable[str] = ()) -> nn.Module:
    """A fake-quantized copy of `module` (ModelOpt's QuantConv2d/QuantLinear, whose forward
    quantizes and dequantizes), calibrated on `inputs` (the graph's real inputs, one tuple per
    call). `module` itself is unchanged. Raises CalibrationUnavailable without modelopt."""
    modelopt_version()
    import modelopt.torch.quantization as mtq

    skip = list(skip)
    unknown = set(skip) - set(quantizable_layers(module))
    if unknown:
        raise ValueError(f"skip names layers the graph does not have: {sorted(unknown)[:5]}")
    q = copy.deepcopy(module).eval()
    loop = forward_loop(inputs)
    # SmoothQuant (or max) calibration of every quantizer: weights and FP8 activations keep it
    with contextlib.redirect_stdout(io.StringIO()):  # ModelOpt prints a line per step
        q = mtq.quantize(q, modelopt_config(recipe, skip), forward_loop=loop)
    if recipe.calibrator != "max":
        _histogram_ranges(q, loop, recipe)
    if recipe.quantized_residuals:  # after calibration: the ranges are those of the float activations
        for m in q.modules():
            if isinstance(m, ResidualBottleneck):
                m.register_forward_pre_hook(_skip_reads_quantized_input)
    return q


def _first_input_quantizer(block: nn.Module) -> nn.Module | None:
    """The enabled input quantizer of a ResidualBottleneck's first convolution, or None."""
    t = getattr(block.branch[0], "input_quantizer", None)
    return t if t is not None and t.is_enabled else None


def _skip_reads_quantized_input(block: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
    """Forward pre-hook of a ResidualBottleneck: its input as its first convolution's enabled
    input quantizer gives it (the module docstring), for the skip and the branch alike (the
    branch's quantizer then gives back the same values). Nothing where that layer is float."""
    t = _first_input_quantizer(block)
    return None if t is None else (t(args[0]),)


def _has_skip_hook(m: nn.Module) -> bool:
    return _skip_reads_quantized_input in m._forward_pre_hooks.values()


def quantized_residuals(q: nn.Module) -> list[str]:
    """The residual blocks of `q` (a module from `quantize`) whose skip reads the quantized input
    of their first convolution, that layer quantized: where calibration/qdq_export.py reroutes the
    sum's input."""
    return [name for name, m in q.named_modules()
            if isinstance(m, ResidualBottleneck) and _has_skip_hook(m) and _first_input_quantizer(m) is not None]


def _histogram_ranges(q: nn.Module, loop: Callable[[nn.Module], None], recipe: Recipe) -> None:
    """Activation ranges from a histogram of what each input (and output) quantizer sees
    (after SmoothQuant's scaling): the `percentile` of |x|, or the entropy calibrator's clip.
    The other quantizers stay as they are while the histograms are collected, unquantized."""
    from modelopt.torch.quantization.calib import HistogramCalibrator

    acts = [t for m in q.modules() if isinstance(m, LAYER_TYPES)
            for t in (getattr(m, "input_quantizer", None), getattr(m, "output_quantizer", None))
            if t is not None and t.is_enabled]
    quantizers = acts + [m.weight_quantizer for m in q.modules() if isinstance(m, LAYER_TYPES)
                         and hasattr(m, "weight_quantizer") and m.weight_quantizer.is_enabled]
    for t in quantizers:
        t.disable_quant()
    for t in acts:
        t._calibrator = HistogramCalibrator(num_bits=t.num_bits, axis=None, unsigned=False)
        t.enable_calib()
    loop(q)
    for t in acts:
        if recipe.calibrator == "percentile":
            t.load_calib_amax("percentile", percentile=recipe.percentile)
        else:
            t.load_calib_amax("entropy")
        t.disable_calib()
    for t in quantizers:
        t.enable_quant()


@contextlib.contextmanager
def partly_quantized(module: nn.Module, q: nn.Module, layers: Iterable[str]) -> Iterator[nn.Module]:
    """`module` itself (float) with `layers` swapped for their quantized versions in `q` (a
    quantized copy of it, from `quantize`) until the `with` block ends. What the sensitivity
    analysis runs: the float layers go at PyTorch's speed, where a whole quantized copy with
    its other quantizers turned off still pays ModelOpt's Python cost on every layer (the tiny
    model's denoiser: 0.5 s a call against 0.1 s float). The residual blocks read their
    quantized input as in `q` where `q` does (`quantized_residuals`)."""
    originals = []
    hooks = []
    if any(_has_skip_hook(m) for m in q.modules()):
        hooks = [m.register_forward_pre_hook(_skip_reads_quantized_input)
                 for m in module.modules() if isinstance(m, ResidualBottleneck)]
    try:
        for name in layers:
            parent, _, child = name.rpartition(".")
            owner = module.get_submodule(parent)
            originals.append((owner, child, getattr(owner, child)))
            setattr(owner, child, q.get_submodule(name))
        yield module
    finally:
        for owner, child, layer in reversed(originals):
            setattr(owner, child, layer)
        for h in hooks:
            h.remove()


def keep_float(q: nn.Module, module: nn.Module, layers: Iterable[str]) -> None:
    """Put copies of `module`'s float `layers` back into its quantized copy `q` (in place): no
    quantizers and no SmoothQuant scaling there, as if `quantize` had skipped them. The ranges
    of the other layers do not change (ModelOpt calibrates every range on float activations)."""
    for name in layers:
        parent, _, child = name.rpartition(".")
        setattr(q.get_submodule(parent), child, copy.deepcopy(module.get_submodule(name)))


def folded(q: nn.Module) -> nn.Module:
    """A copy of a quantized module with its weights fake-quantized once (ModelOpt's
    fold_weight): computes what `q` computes, without quantizing every weight again on every
    call (a third of the time of the decodes that measure the loss). `q` keeps its weight
    quantizers, which the Q/DQ export writes."""
    import modelopt.torch.quantization as mtq

    out = copy.deepcopy(q)
    mtq.fold_weight(out)
    return out
