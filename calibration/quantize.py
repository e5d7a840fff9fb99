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
Runtime's fused INT8 kernels expect. `skip` names layers that keep float weights and inputs.

A "block" is the unit of the sensitivity analysis (calibration/sensitivity.py): a ResBlock or
transformer of the UNet (one element of input_blocks/output_blocks/middle_block), a VAE
ResnetBlock, up/downsampler or mid-block part, or a single layer (stems, zero convs). See
`block_of`.

modelopt is an optional extra (`pip install -e ".[calibrate]"`), imported inside functions.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

LAYER_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
PRECISIONS = ("int8", "fp8")
CALIBRATORS = ("percentile", "entropy", "max")


class CalibrationUnavailable(ValueError):
    """nvidia-modelopt is not installed."""


@dataclass(frozen=True)
class Recipe:
    """How one precision is calibrated. smoothquant_alpha: None turns SmoothQuant off;
    percentile: of |activation|, for calibrator "percentile"."""

    precision: str = "int8"
    calibrator: str = "percentile"
    percentile: float = 99.99
    smoothquant_alpha: float | None = 0.8

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.calibrator not in CALIBRATORS:
            raise ValueError(f"calibrator must be one of {CALIBRATORS}, not {self.calibrator!r}")
        if self.precision == "fp8" and (self.calibrator != "max" or self.smoothquant_alpha is not None):
            raise ValueError("FP8 is calibrated with max and without SmoothQuant (Recipe.fp8())")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], not {self.percentile}")

    @staticmethod
    def fp8() -> "Recipe":
        return Recipe("fp8", "max", 100.0, None)

    def describe(self) -> dict:
        return asdict(self)


def modelopt_version() -> str:
    try:
        import modelopt
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
    types, none on the layers in `skip` (exact layer names)."""
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
    return q


def _histogram_ranges(q: nn.Module, loop: Callable[[nn.Module], None], recipe: Recipe) -> None:
    """Activation ranges from a histogram of what each input quantizer sees (after SmoothQuant's
    scaling): the `percentile` of |x|, or the entropy calibrator's clip. The other quantizers
    stay as they are while the histograms are collected, unquantized."""
    from modelopt.torch.quantization.calib import HistogramCalibrator

    acts = [m.input_quantizer for m in q.modules() if isinstance(m, LAYER_TYPES) and hasattr(m, "input_quantizer")
            and m.input_quantizer.is_enabled]
    quantizers = [t for m in q.modules() if isinstance(m, LAYER_TYPES)
                  for t in (getattr(m, "input_quantizer", None), getattr(m, "weight_quantizer", None))
                  if t is not None and t.is_enabled]
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


def set_quantized(q: nn.Module, layers: set[str] | None) -> None:
    """Turn the quantizers of a quantized copy on for `layers` (None: all) and off elsewhere;
    SmoothQuant's scaling stays, so the float layers compute what they did."""
    for name, m in q.named_modules():
        if isinstance(m, LAYER_TYPES) and hasattr(m, "input_quantizer"):
            on = layers is None or name in layers
            for t in (m.input_quantizer, m.weight_quantizer):
                if t.amax is not None:  # calibrated: not a layer the config left out
                    t.enable() if on else t.disable()


def quantized_layers(q: nn.Module) -> list[str]:
    """Layers of a quantized copy whose input and weight quantizers are both on."""
    return [n for n, m in q.named_modules() if isinstance(m, LAYER_TYPES) and hasattr(m, "input_quantizer")
            and m.input_quantizer.is_enabled and m.weight_quantizer.is_enabled]

