"""Which graphs run in reduced precision, and which operations inside them stay fp32.

TensorRT 11 builds strongly typed networks: the precision of every tensor is the one the ONNX
graph gives it, so these decisions live in the exported graphs (as casts written in the
PyTorch modules) rather than in builder flags.
"""

# Graphs exported in fp16. The LFGCM graphs stay fp32: the entropy-parameter networks decide
# CDF indexes, which must come out identical on the encoder and the decoder, and the
# hyper-synthesis output feeds them.
FP16_GRAPHS = ("vae_encoder", "synthesis", "denoiser", "vae_decoder")


def fp32_by_design(graph: str) -> bool:
    """Whether a graph runs in fp32 at every precision a backend is asked for: the LFGCM graphs
    (analysis, hyper_synthesis, entropy_anchor_k, entropy_nonanchor_k), whose outputs decide
    symbols and CDF indexes. Every other graph must exist in the precision asked for."""
    return graph not in FP16_GRAPHS

# Operations kept in fp32 inside the fp16 graphs, and why.
FP16_ISLANDS = {
    "group_norm": "mean/variance over up to 64x96x... elements overflow or lose precision in fp16; "
                  "statistics and normalization run in fp32 (every GroupNorm of VAE, UNet, control)",
    "vae_attention": "the VAE mid-block attention is single-head over 512 channels: its logits "
                     "exceed the fp16 range on real images; it runs in fp32",
}
