"""Text encoders by name: the offline MiniLM default, and T5/CLIP architectures."""

import pytest
import torch

from mdm.conditioning import TextEncoder, make_condition
from mdm.config import ConditioningConfig


def test_default_encoder_is_offline_minilm(text_encoder):
    assert text_encoder.dim == 384
    tokens, mask = text_encoder.encode(["fox face", "a red apple on a table", ""])
    assert tokens.shape == (3, 16, 384) and mask.shape == (3, 16)
    assert mask[0].sum() < mask[1].sum()  # padding is masked
    assert not torch.allclose(tokens[0], tokens[1])
    again, _ = text_encoder.encode(["fox face"])
    assert torch.allclose(again[0], tokens[0], atol=1e-5)


def test_encoding_only_the_longest_prompt_matches_padding_to_max_length(text_encoder):
    """encode() runs the network on the batch's longest prompt, not on max_length tokens; the
    valid tokens must come out as the full-length run gives them, whatever the batch, and
    padded slots must be zero and masked."""
    prompts = ["fox face", "a red apple on a wooden table, noto style", ""]
    tokens, mask = text_encoder.encode(prompts)
    full = text_encoder.tokenizer(
        prompts, padding="max_length", truncation=True, max_length=text_encoder.max_length, return_tensors="pt"
    )
    with torch.no_grad():
        ref = text_encoder.model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).last_hidden_state
    assert torch.equal(mask, full["attention_mask"].bool())
    assert torch.allclose(tokens[mask], ref[mask], atol=1e-4)
    assert mask.sum(1).max() < mask.shape[1] and not tokens[~mask].any()
    alone, alone_mask = text_encoder.encode(["fox face"])  # shorter batch, fewer positions run
    assert alone.shape == tokens[:1].shape and torch.equal(alone_mask[0], mask[0])
    assert torch.allclose(alone[0][mask[0]], tokens[0][mask[0]], atol=1e-4)


def _tiny_hf_model(tmp_path, kind, text_encoder):
    """A randomly initialised T5 encoder or CLIP text tower saved as a Hugging Face folder."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    vocab = text_encoder.tokenizer.vocab_size
    if kind == "t5":
        model = T5EncoderModel(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    else:
        model = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab,
                hidden_size=48,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
            )
        )
    folder = tmp_path / kind
    model.save_pretrained(folder)
    text_encoder.tokenizer.save_pretrained(folder)
    return folder, (32 if kind == "t5" else 48)


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_hugging_face_encoders_by_path(tmp_path, kind, text_encoder):
    folder, dim = _tiny_hf_model(tmp_path, kind, text_encoder)
    enc = TextEncoder(str(folder), max_length=12)
    expected = {"t5": "T5EncoderModel", "clip": "CLIPTextModel"}[kind]
    assert type(enc.model).__name__ == expected
    tokens, mask = enc.encode(["a penguin", "a rocket in space"])
    assert tokens.shape == (2, 12, dim) and enc.dim == dim
    cfg = ConditioningConfig(text_encoder=str(folder), text_dim=dim, max_text_tokens=12)
    cond = make_condition(cfg, 2, prompts=["a", "b"], encoder=enc)
    assert cond.text_tokens.shape == (2, 12, dim)


def test_encoder_width_mismatch_is_explained(text_encoder):
    cfg = ConditioningConfig(text_dim=512, max_text_tokens=16)
    with pytest.raises(ValueError, match="has width 384 but the model expects text_dim=512"):
        make_condition(cfg, 1, prompts=["x"], encoder=text_encoder)


def test_unknown_encoder_is_explained():
    with pytest.raises(RuntimeError, match="cannot load text encoder"):
        TextEncoder("/nonexistent/encoder-folder")


def test_condition_kinds_reject_the_wrong_input(text_encoder):
    with pytest.raises(ValueError, match="pass prompts, not class labels"):
        make_condition(ConditioningConfig(max_text_tokens=16), 1, labels=[1], encoder=text_encoder)
    with pytest.raises(ValueError, match=r"must be in \[0, 9\]"):
        make_condition(ConditioningConfig(kind="class", num_classes=10), 2, labels=[1, 10])
    with pytest.raises(ValueError, match="unconditional"):
        make_condition(ConditioningConfig(kind="none"), 1, prompts=["x"])
