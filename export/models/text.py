"""OpenCLIP text tower (ViT-H/14 text transformer in SD 2.1), as SD 2.1 uses it.

OSDiff conditions the UNet on the empty prompt only, so this runs once at export to produce a
constant context. SD 2.1 takes the "penultimate" layer: the last resblock is skipped and
ln_final is applied to the output of the one before it. Attribute names are open_clip's, so
the state_dict keys are the checkpoint's under "cond_stage_model.model.".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from osdiff.config import TextConfig

SOT, EOT = 49406, 49407  # CLIP BPE start/end-of-text ids; padding is 0 in open_clip


def empty_prompt_tokens(context_length: int = 77) -> Tensor:
    """open_clip.tokenize([""]): start, end, then zero padding. 1 x context_length int64."""
    tokens = torch.zeros(1, context_length, dtype=torch.long)
    tokens[0, 0], tokens[0, 1] = SOT, EOT
    return tokens


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter layout (packed q,k,v)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5 + mask
        out = att.softmax(dim=-1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact (erf) GELU, as open_clip's nn.GELU


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_width)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_width) for _ in range(layers))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class TextEncoder(nn.Module):
    """Tokens B x L -> context B x L x width (penultimate block, then ln_final).

    Holds only the blocks that run (layers - 1); the checkpoint's last block,
    text_projection and logit_scale are listed by `unused_key_shapes`.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        n = cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(n, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers - 1, cfg.heads, int(cfg.width * cfg.mlp_ratio))
        self.ln_final = nn.LayerNorm(cfg.width)

    def forward(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        # causal: position i attends to 0..i (open_clip builds the mask; checkpoints do not store it)
        mask = torch.full((n, n), float("-inf"), device=tokens.device).triu(1)
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.transformer(x, mask)
        return self.ln_final(x)


def unused_key_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Keys (without "cond_stage_model.model.") and shapes of the text tower's parts that
    the penultimate-layer encoding never uses."""
    w, h = cfg.width, int(cfg.width * cfg.mlp_ratio)
    last = f"transformer.resblocks.{cfg.layers - 1}."
    block = {
        "ln_1.weight": (w,), "ln_1.bias": (w,),
        "attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,),
        "attn.out_proj.weight": (w, w), "attn.out_proj.bias": (w,),
        "ln_2.weight": (w,), "ln_2.bias": (w,),
        "mlp.c_fc.weight": (h, w), "mlp.c_fc.bias": (h,),
        "mlp.c_proj.weight": (w, h), "mlp.c_proj.bias": (w,),
    }
    out = {last + k: s for k, s in block.items()}
    out["text_projection"] = (w, cfg.projection_dim)
    out["logit_scale"] = ()
    return out
