"""NestedUNet (Gu et al. 2024, Sec. 3.2) and the conditioned model around it.

The UNet of resolution r contains the UNet of resolution r/k in place of its middle
blocks. The outer net's bottom features enter the inner net through a zero-initialised
3x3 conv (``in_adapter``) and are *added* to the inner net's own input features; the
inner net's last features come back through a second zero-initialised conv
(``out_adapter``) and are added to the outer features before the outer up path.
Because both adapters start at zero, wrapping a trained net in a new shell leaves its
predictions unchanged.

All tensor lists are ordered by resolution, lowest first (``config.resolutions``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig, UNetConfig
from .layers import AttentionBlock, Downsample, ResBlock, Upsample, timestep_embedding, zero_

__all__ = ["Condition", "NestedUNet", "MDMModel"]


@dataclass
class Condition:
    """Per-sample conditioning for one batch (any field may be None).

    text_tokens: (B, L, text_dim) frozen-encoder token features; text_mask: (B, L) bool,
    True for real tokens; labels: (B,) int64 class ids, -1 for "no class" (the null class
    of guidance); source_size: (B,) float, the source image's shorter side in pixels
    (micro-conditioning).
    """

    text_tokens: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    source_size: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False) -> Condition:
        def mv(x: torch.Tensor | None, floating: bool) -> torch.Tensor | None:
            if x is None:
                return None
            want = dtype if (floating and dtype is not None) else None
            return x.to(device=device, dtype=want, non_blocking=non_blocking)

        return Condition(
            mv(self.text_tokens, True), mv(self.text_mask, False), mv(self.labels, False), mv(self.source_size, False)
        )

    def pin_memory(self) -> Condition:
        """The same condition in page-locked host memory, so that ``to(cuda, non_blocking=True)``
        copies without making the host wait for the device (needs CUDA)."""

        def pin(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.pin_memory()

        return Condition(pin(self.text_tokens), pin(self.text_mask), pin(self.labels), pin(self.source_size))

    @staticmethod
    def cat(conds: list[Condition]) -> Condition:
        def c(xs: list[torch.Tensor | None]) -> torch.Tensor | None:
            if all(x is None for x in xs):
                return None
            if any(x is None for x in xs):
                raise ValueError("cannot concatenate conditions where a field is set for some and not others")
            return torch.cat(xs, 0)  # type: ignore[arg-type]

        return Condition(
            c([x.text_tokens for x in conds]),
            c([x.text_mask for x in conds]),
            c([x.labels for x in conds]),
            c([x.source_size for x in conds]),
        )

    def select(self, index: torch.Tensor | slice) -> Condition:
        def s(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[index]

        return Condition(s(self.text_tokens), s(self.text_mask), s(self.labels), s(self.source_size))


class _Level(nn.Module):
    """The res blocks (each optionally followed by attention layers) of one UNet level."""

    def __init__(self, in_chs: list[int], out_ch: int, n_attn: int, cfg: UNetConfig, emb_dim: int, ctx_dim: int):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c, out_ch, emb_dim, cfg.num_groups, cfg.dropout) for c in in_chs)
        self.attn = nn.ModuleList(
            nn.ModuleList(
                AttentionBlock(out_ch, cfg.num_heads, cfg.num_groups, ctx_dim, cfg.attention_ffn) for _ in range(n_attn)
            )
            for _ in in_chs
        )


class NestedUNet(nn.Module):
    """A UNet at ``resolutions[-1]`` holding the NestedUNet of ``resolutions[:-1]`` inside."""

    def __init__(
        self,
        unets: list[UNetConfig],
        in_channels: int,
        emb_dim: int,
        ctx_dim: int,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        cfg = unets[-1]
        self.cfg = cfg
        self.gradient_checkpointing = gradient_checkpointing
        self.inner = (
            NestedUNet(unets[:-1], in_channels, emb_dim, ctx_dim, gradient_checkpointing) if len(unets) > 1 else None
        )
        ch = cfg.channels
        assert cfg.attention_layers is not None
        self.conv_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)

        skips = [ch[0]]
        cur = ch[0]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, c in enumerate(ch):
            ins = [cur] + [c] * (cfg.num_res_blocks[i] - 1)
            self.down.append(_Level(ins, c, cfg.attention_layers[i], cfg, emb_dim, ctx_dim))
            skips += [c] * cfg.num_res_blocks[i]
            cur = c
            if i < len(ch) - 1:
                self.downsample.append(Downsample(c))
                skips.append(c)

        if self.inner is not None:
            inner_ch = unets[-2].channels[0]
            self.in_adapter = zero_(nn.Conv2d(cur, inner_ch, 3, padding=1))
            self.out_adapter = zero_(nn.Conv2d(inner_ch, cur, 3, padding=1))
        if cfg.mid_block:
            self.mid = _Level([cur, cur], cur, 0, cfg, emb_dim, ctx_dim)
            self.mid_attn = AttentionBlock(cur, cfg.num_heads, cfg.num_groups, ctx_dim, cfg.attention_ffn)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(ch))):
            c = ch[i]
            ins = []
            for _ in range(cfg.num_res_blocks[i] + 1):
                ins.append(cur + skips.pop())
                cur = c
            self.up.append(_Level(ins, c, cfg.attention_layers[i], cfg, emb_dim, ctx_dim))
            if i > 0:
                self.upsample.append(Upsample(c))
        assert not skips
        self.norm_out = nn.GroupNorm(cfg.num_groups, cur)
        self.conv_out = zero_(nn.Conv2d(cur, in_channels, 3, padding=1))

    # ------------------------------------------------------------------ helpers
    def _call(self, fn: nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _level(
        self,
        level: _Level,
        h: torch.Tensor,
        emb: torch.Tensor,
        ctx,
        ctx_mask,
        skips: list[torch.Tensor] | None,
        pop: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        for res, attns in zip(level.res, level.attn):
            if pop is not None:
                h = torch.cat([h, pop.pop()], dim=1)
            h = self._call(res, h, emb)
            for attn in attns:
                h = self._call(attn, h, ctx, ctx_mask)
            if skips is not None:
                skips.append(h)
        return h

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        zs: list[torch.Tensor],
        embs: list[torch.Tensor],
        ctx: torch.Tensor | None = None,
        ctx_mask: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Predictions for every resolution (lowest first) and this net's last features.

        ``zs``: noisy inputs, lowest resolution first, one per nested level; an outer
        level may hold only the first samples of the batch (mixed-ratio training): the
        inner net then sees zero outer features for the others, as if it ran alone.
        ``embs``: the conditioning vector of each level, lowest first.
        ``features``: the outer net's adapted features, added to the input features.
        """
        bh = zs[-1].shape[0]
        emb = embs[-1][:bh]
        ctx_full, mask_full = ctx, ctx_mask
        if ctx is not None:
            ctx = ctx[:bh]
        if ctx_mask is not None:
            ctx_mask = ctx_mask[:bh]
        h = self.conv_in(zs[-1])
        if features is not None:
            h = h + features
        skips = [h]
        for i, level in enumerate(self.down):
            h = self._level(level, h, emb, ctx, ctx_mask, skips, None)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                skips.append(h)

        inner_preds: list[torch.Tensor] = []
        if self.inner is not None:
            feats = self.in_adapter(h)
            bl = zs[-2].shape[0]
            if bl > bh:  # the samples this shell skips get no outer features
                feats = torch.cat([feats, feats.new_zeros(bl - bh, *feats.shape[1:])])
            inner_preds, inner_h = self.inner(zs[:-1], embs[:-1], ctx_full, mask_full, feats)
            h = h + self.out_adapter(inner_h[:bh])
        if self.cfg.mid_block:
            h = self._call(self.mid.res[0], h, emb)
            h = self._call(self.mid_attn, h, ctx, ctx_mask)
            h = self._call(self.mid.res[1], h, emb)

        for i, level in enumerate(self.up):
            h = self._level(level, h, emb, ctx, ctx_mask, None, skips)
            if i < len(self.upsample):
                h = self.upsample[i](h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return inner_preds + [out], h


class MDMModel(nn.Module):
    """The conditioned NestedUNet: ``model(zs, t, cond) -> [prediction per resolution]``.

    The conditioning vector of the blocks of resolution r is
    ``emb_r = MLP(sinusoid(1000 t)) + W_text · pool(ctx) | class_emb[label] + MLP_micro(sinusoid(min(size, r)))``.

    The source size is clamped at each level's own resolution, as the reference does with
    each UNet's ``scale`` micro-condition (``min(size, default)``). Training feeds a
    stage's top resolution, so the inner net of a grown model sees the same value the
    previous stage trained with, with or without a source size: growth stays exact.
    Without a source size every level sees its own resolution (what training feeds).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        cond = config.conditioning
        e = config.emb_dim
        self.time_embed = nn.Sequential(nn.Linear(e // 4, e), nn.SiLU(), nn.Linear(e, e))
        self.ctx_proj: nn.Module | None = None
        self.text_pool: nn.Linear | None = None
        self.class_embed: nn.Embedding | None = None
        if cond.kind == "text":
            if cond.context_dim:
                self.ctx_proj = nn.Linear(cond.text_dim, cond.context_dim)
            self.text_pool = nn.Linear(cond.ctx_dim, e, bias=False)
        elif cond.kind == "class":
            self.class_embed = nn.Embedding(cond.num_classes + 1, e)  # last row: the null class
        self.micro_embed = (
            nn.Sequential(nn.Linear(e // 4, e), nn.SiLU(), zero_(nn.Linear(e, e))) if cond.micro_conditioning else None
        )
        self.unet = NestedUNet(config.unets, config.in_channels, e, cond.ctx_dim, config.gradient_checkpointing)

    @property
    def resolutions(self) -> list[int]:
        return list(self.config.resolutions)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for m in self.modules():
            if isinstance(m, NestedUNet):
                m.gradient_checkpointing = enabled

    def embed(
        self, t: torch.Tensor, cond: Condition, batch: int
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """The conditioning vector (B, emb_dim) of every level (lowest first) and the
        attention context with its mask."""
        ccfg = self.config.conditioning
        e = self.config.emb_dim
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t * 1000.0, e // 4).to(dtype))
        ctx = mask = None
        if ccfg.kind == "text":
            if cond.text_tokens is None:
                raise ValueError("this model is text-conditioned: pass Condition(text_tokens=..., text_mask=...)")
            ctx = cond.text_tokens.to(dtype)
            if self.ctx_proj is not None:
                ctx = self.ctx_proj(ctx)
            mask = cond.text_mask
            if mask is None:
                mask = torch.ones(ctx.shape[:2], dtype=torch.bool, device=ctx.device)
            w = mask.to(ctx.dtype)[..., None]
            pooled = (ctx * w).sum(1) / w.sum(1).clamp_min(1.0)
            assert self.text_pool is not None
            emb = emb + self.text_pool(pooled)
        elif ccfg.kind == "class":
            if cond.labels is None:
                raise ValueError("this model is class-conditioned: pass Condition(labels=...) (-1 = no class)")
            labels = torch.where(cond.labels < 0, torch.full_like(cond.labels, ccfg.num_classes), cond.labels)
            assert self.class_embed is not None
            emb = emb + self.class_embed(labels)
        if self.micro_embed is None:
            return [emb] * len(self.config.resolutions), ctx, mask
        embs = []
        for r in self.config.resolutions:  # one call per level: bitwise what a smaller model computes
            if cond.source_size is None:
                size = torch.full((batch,), float(r), device=emb.device)
            else:
                size = cond.source_size.float().clamp(max=float(r))
            embs.append(emb + self.micro_embed(timestep_embedding(size, e // 4).to(dtype)))
        return embs, ctx, mask

    def forward(self, zs: list[torch.Tensor], t: torch.Tensor, cond: Condition) -> list[torch.Tensor]:
        """One prediction (v, eps or x0, as the diffusion config says) per resolution."""
        if len(zs) != len(self.config.resolutions):
            raise ValueError(
                f"expected {len(self.config.resolutions)} inputs for resolutions "
                f"{self.config.resolutions}, got {len(zs)}"
            )
        for z, r in zip(zs, self.config.resolutions):
            if z.shape[-1] != r or z.shape[-2] != r or z.shape[1] != self.config.in_channels:
                raise ValueError(
                    f"input for resolution {r} must be (B, {self.config.in_channels}, {r}, {r}), got {tuple(z.shape)}"
                )
        if any(a.shape[0] < b.shape[0] for a, b in zip(zs, zs[1:])):
            raise ValueError("an outer resolution may hold only a prefix of the batch, never more samples")
        embs, ctx, mask = self.embed(t, cond, zs[0].shape[0])
        preds, _ = self.unet(zs, embs, ctx, mask)
        return preds
