"""Exact self-attention whose memory grows linearly with the number of positions.

softmax(q k^T / sqrt(d)) v over N positions holds an N x N score matrix when computed in one
piece: 64 GB for the VAE's mid-block at 12 Mpixel (N = 189,504), 17 GB for the small `demo`
VAE at 4 Mpixel. Each query's row of scores is independent of every other query's, so the
queries are processed in blocks, each block seeing all keys: the result is the same attention
(to float rounding), and at most CHUNK_BYTES of scores exist at a time.

- PyTorch: F.scaled_dot_product_attention per block of queries (one call when everything fits).
  On the CPU it picks its flash kernel (itself linear in N) only for inputs whose last dimension
  is contiguous, which is why callers pass contiguous q, k, v; the blocks bound the memory of
  the kernels that do materialize scores (the math fallback, CUDA's fp32 paths for wide heads).
- Exported graphs (torch.onnx.export): the blocks become one ONNX Scan over query blocks
  (torch's `scan` higher-order op, which the exporter translates), block size computed in the
  graph from the runtime shapes, so ONNX Runtime and TensorRT run the same bounded loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Scores of one block of queries, in bytes (float32 elements: block x keys x heads x batch x 4).
CHUNK_BYTES = 64 * 2**20


def query_block(b: int, h: int, n: int) -> int:
    """Queries per block for B x H x N x N attention: as many as CHUNK_BYTES of scores hold, at
    least 1, at most N. The cap at N matters to the Scan, which pads q to whole blocks: a block
    sized for CHUNK_BYTES on a small image is many times N (a 64x64 image on the full-size
    model took 18 GB of padding and scores in ONNX Runtime before it). torch.sym_* keep the
    value symbolic when exporting and are plain min/max on ints."""
    return torch.sym_min(n, torch.sym_max(1, CHUNK_BYTES // (4 * b * h * n)))


def query_blocks(q: Tensor) -> Tensor:
    """B x H x N x d -> blocks x B x H x block x d: q padded with zeros to whole blocks."""
    b, h, n, _ = q.shape
    block = query_block(b, h, n)
    return F.pad(q, (0, 0, 0, (-n) % block)).unflatten(2, (-1, block)).permute(2, 0, 1, 3, 4)


def self_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Exact attention, B x H x N x d each -> B x H x N x d, scale d^-0.5 (SDPA's default).
    Inputs should be contiguous in their last dimension (see the module docstring)."""
    if torch.compiler.is_exporting():
        return _scan_blocks(q, k, v)
    b, h, n, _ = q.shape
    block = query_block(b, h, n)
    if block == n:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(qb, k, v) for qb in q.split(block, dim=2)], dim=2)


def _scan_blocks(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The same blocks as one Scan: q is padded to whole blocks, scanned block by block, and
    the padding cut off again. Shapes stay symbolic, so the block size follows N at run time."""
    from torch._higher_order_ops.scan import scan

    n = q.shape[2]
    blocks = query_blocks(q)

    def step(carry: Tensor, q_block: Tensor) -> tuple[Tensor, Tensor]:
        # scan needs a carried value; this one only passes through
        return carry + 0, F.scaled_dot_product_attention(q_block, k, v)

    _, out = scan(step, torch.zeros(1, dtype=q.dtype, device=q.device), blocks)
    return out.permute(1, 2, 0, 3, 4).flatten(2, 3)[:, :, :n]
