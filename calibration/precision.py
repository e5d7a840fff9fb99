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

# Operations kept in fp32 inside the fp16 graphs, and why.
FP16_ISLANDS = {
    "group_norm": "mean/variance over up to 64x96x... elements overflow or lose precision in fp16; "
                  "statistics and normalization run in fp32 (every GroupNorm of VAE, UNet, control)",
    "vae_attention": "the VAE mid-block attention is single-head over 512 channels: its logits "
                     "exceed the fp16 range on real images; it runs in fp32",
}
