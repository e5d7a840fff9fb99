"""Which graphs run in reduced precision, and which operations inside them stay fp32.

TensorRT 11 builds strongly typed networks: the precision of every tensor is the one the ONNX
graph gives it, so these decisions live in the exported graphs (as casts written in the
PyTorch modules, or Q/DQ nodes written by calibration) rather than in builder flags.
"""

# Graphs exported in fp16. The LFGCM graphs stay fp32: the entropy-parameter networks decide
# CDF indexes, which must come out identical on the encoder and the decoder, and the
# hyper-synthesis output feeds them.
FP16_GRAPHS = ("vae_encoder", "synthesis", "denoiser", "vae_decoder")

# Graphs that `osdiff calibrate` quantizes to INT8/FP8: the same heavy ones, for the same reason.
QUANTIZED_GRAPHS = FP16_GRAPHS

# What a calibrated precision may lose end to end against fp32, on the decoded image (mean over
# images): PSNR in dB and MS-SSIM. A calibration over these is not registered unless accepted.
TARGETS = {"psnr_drop_db": 0.3, "ms_ssim_drop": 0.005}


def fp32_by_design(graph: str) -> bool:
    """Whether a graph runs in fp32 at every precision a backend is asked for: the LFGCM graphs
    (analysis, hyper_synthesis, entropy_anchor_k, entropy_nonanchor_k), whose outputs decide
    symbols and CDF indexes. Every other graph must exist in the precision asked for."""
    return graph not in FP16_GRAPHS


# Operations kept in fp32 inside the fp16 graphs, and why. The numbers: calibration/islands.py
# on the built-in model's calibration crops (benchmarks/results/precision_cpu.json,
# "fp16_islands"); SD 2.1's trained weights, for which these islands were written, are not on any
# machine here, so nothing measured here speaks for them.
FP16_ISLANDS = {
    "group_norm": "every GroupNorm of VAE, UNet and control module computes its statistics and "
                  "normalization in fp32. Measured on the built-in model: inputs up to 133, |group "
                  "mean| / group std up to 4.2, and F.group_norm in fp16 off by 8.2e-4 of the "
                  "output's largest value",
    "vae_attention": "the VAE mid-block attention (single head over all channels) runs in fp32. Kept "
                     "for SD 2.1, but NOT supported by any measurement here: on the built-in model its "
                     "largest |logit| is 32.3 (fp16 overflows at 65504) and softmax in fp16 is off by "
                     "1.3e-3; the fused attention kernels of TensorRT and cuDNN accumulate the logits "
                     "in fp32 anyway. A candidate to drop once SD 2.1's logits are measured",
}
