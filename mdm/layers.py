"""Building blocks of the UNets: residual blocks, attention, resampling, embeddings.

Every block is channels-last friendly (1x1 convs and GroupNorm, no NCHW-only reshapes in
the hot path), bf16-safe (softmax inside SDPA, norms in the autocast dtype policy) and
free of host synchronisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "zero_",
    "timestep_embedding",
    "ResBlock",
    "AttentionBlock",
    "Downsample",
    "Upsample",
]


def zero_(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (adapters and output layers start at zero)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a (B,) tensor into (B, dim), computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, scale-shift by the conditioning vector, GroupNorm-SiLU-conv.

    ``h = conv2(silu(norm2(conv1(silu(norm1(x)))) * (1 + a) + b)) + skip(x)`` with
    ``(a, b) = Linear(silu(emb))``; conv2 starts at zero so a new block is the identity.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, num_groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(num_groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        h = self.conv2(self.dropout(h))
        return h + self.skip(x)


class AttentionBlock(nn.Module):
    """Self-attention over pixels plus cross-attention to text tokens, summed.

    ``x + proj(SDPA(q, k, v) + SDPA(q, k_ctx, v_ctx, mask))`` with q, k, v from a 1x1 conv
    of GroupNorm(x) and k_ctx, v_ctx from LayerNorm(ctx); optionally followed by a 4x
    feed-forward. Both output projections start at zero.
    """

    def __init__(self, channels: int, num_heads: int, num_groups: int, ctx_dim: int = 0, ffn: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        if ctx_dim > 0:
            self.ctx_norm = nn.LayerNorm(ctx_dim)
            self.ctx_kv = nn.Linear(ctx_dim, 2 * channels)
        else:
            self.ctx_norm = None
            self.ctx_kv = None
        self.proj = zero_(nn.Conv2d(channels, channels, 1))
        if ffn:
            self.ffn = nn.Sequential(
                nn.GroupNorm(num_groups, channels),
                nn.Conv2d(channels, 4 * channels, 1),
                nn.GELU(),
                zero_(nn.Conv2d(4 * channels, channels, 1)),
            )
        else:
            self.ffn = None

    def forward(
        self,
        x: torch.Tensor,
        ctx: torch.Tensor | None = None,
        ctx_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        heads, d = self.num_heads, c // self.num_heads
        # (B, 3C, H, W) -> (B, HW, 3, heads, d) -> 3 x (B, heads, HW, d); a view for channels-last.
        qkv = self.qkv(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        if self.ctx_kv is not None and ctx is not None:
            kv = self.ctx_kv(self.ctx_norm(ctx)).reshape(b, ctx.shape[1], 2, heads, d)
            kc, vc = kv.permute(2, 0, 3, 1, 4).unbind(0)
            mask = None if ctx_mask is None else ctx_mask[:, None, None, :]
            out = out + F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
        # (B, heads, HW, d) -> (B, H, W, C) -> NCHW view (channels-last in memory).
        out = out.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
        x = x + self.proj(out)
        if self.ffn is not None:
            x = x + self.ffn(x)
        return x


class Downsample(nn.Module):
    """Strided 3x3 convolution: halves height and width."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
