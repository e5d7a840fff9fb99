"""The VAE in tiles, for images whose full-resolution activations do not fit in memory.

The VAE's high-resolution levels dominate memory (128 channels x 12 M pixels x 4 bytes = 6 GB
per activation at 12 Mpixel); everything else runs at 1/8 resolution or less. In tiled mode
the VAE encoder and decoder run on square tiles that overlap their neighbours, and the outputs
are blended with linear ramps over the overlaps. GroupNorm statistics and the mid-block
attention are then per tile, so the result differs from a whole-image run (it is a different
decode, not an approximation of the same one), which is why the decoder's grid is written in
the stream (docs/bitstream.md, extension 1) and every decoder reproduces it exactly.

Grid: tiles of `tile` x `tile` pixels (a multiple of the pad multiple), stride tile - overlap,
the last tile along each side aligned to the end; all tiles have one shape (one engine
profile, one CUDA graph). Blend weight of a tile at offset i along a side of length n:
min(1, (i + 1) / (ramp + 1), (n - i) / (ramp + 1)), per side, multiplied; the output is the
weighted sum over tiles divided by the summed weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Candidate tile sides (pixels), largest first: the codec takes the largest that fits.
TILE_SIZES = (2048, 1536, 1024, 768, 512, 384, 256, 128)


@dataclass(frozen=True)
class TileGrid:
    tile: int  # pixels, a multiple of the pad multiple
    overlap: int  # pixels, a multiple of the pad multiple, < tile

    @staticmethod
    def default(tile: int, multiple: int) -> "TileGrid":
        """A quarter of the tile overlaps, rounded to the pad multiple."""
        return TileGrid(tile, max(multiple, tile // 4 // multiple * multiple))

    def check(self, multiple: int) -> None:
        if self.tile <= 0 or self.tile % multiple or self.overlap % multiple or not 0 <= self.overlap < self.tile:
            raise ValueError(f"tile grid {self.tile}/{self.overlap}: sides must be multiples of {multiple} "
                             "and the overlap smaller than the tile")


def starts(n: int, tile: int, stride: int) -> list[int]:
    """Offsets of the tiles along a side of n (all of length min(tile, n))."""
    if n <= tile:
        return [0]
    out = list(range(0, n - tile, stride))
    return out + [n - tile]


def _ramp(n: int, ramp: int, device: torch.device) -> Tensor:
    i = torch.arange(n, device=device, dtype=torch.float32)
    return torch.minimum(torch.ones_like(i), torch.minimum((i + 1) / (ramp + 1), (n - i) / (ramp + 1)))


def run_tiled(fn: Callable[[Tensor], Tensor], x: Tensor, grid: TileGrid, in_scale: int, out_scale: int) -> Tensor:
    """fn over overlapping tiles of x (B x C x H x W), blended. in_scale: pixels per element of
    x (1 for an image, 8 for a latent); out_scale the same for fn's output. Tiles follow the
    grid in pixels, so encoder and decoder grids line up with the latent."""
    _, _, h, w = x.shape
    t, s = grid.tile // in_scale, (grid.tile - grid.overlap) // in_scale
    th, tw = min(t, h), min(t, w)
    k = in_scale / out_scale  # output elements per input element
    out = weight = None
    for y0 in starts(h, t, s):
        for x0 in starts(w, t, s):
            y = fn(x[:, :, y0 : y0 + th, x0 : x0 + tw])
            oh, ow = y.shape[2], y.shape[3]
            if out is None:
                out = torch.zeros(y.shape[0], y.shape[1], int(h * k), int(w * k), dtype=torch.float32, device=y.device)
                weight = torch.zeros(1, 1, int(h * k), int(w * k), dtype=torch.float32, device=y.device)
                ramp = int(grid.overlap / out_scale)
                wy, wx = _ramp(oh, ramp, y.device), _ramp(ow, ramp, y.device)
                tile_weight = (wy[:, None] * wx[None, :])[None, None]
            oy, ox = int(y0 * k), int(x0 * k)
            out[:, :, oy : oy + oh, ox : ox + ow] += y.float() * tile_weight
            weight[:, :, oy : oy + oh, ox : ox + ow] += tile_weight
    assert out is not None and weight is not None
    return out.div_(weight)
