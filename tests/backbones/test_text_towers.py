"""Parity of the CLIP / SigLIP text towers (HF checkpoints, with the tokenizer saved beside them) with
transformers' own models, on tiny random checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from fxjax.backbones.text import load_text_tower
from fxjax.backbones.text_tokenizers import _bytes_to_unicode

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

TEXT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=16
)
VISION = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
)
PROMPTS = ["a photo of a cat.", "a photo of a dog.", "an origami fish", "x", "a very long prompt " * 4]


def tiny_clip_tokenizer():
    """A byte-level CLIP BPE tokenizer over single characters plus a few merges (no Hub download)."""
    chars = list(_bytes_to_unicode().values())
    merges = [("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"), ("c", "a"), ("ca", "t</w>"), ("o", "f</w>")]
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *[c + "</w>" for c in chars], *["".join(m) for m in merges]]
    return T.CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)


def perturbed(model):
    model.eval()
    with torch.no_grad():  # move every weight off its init (ones, zeros) so that no mapping hides
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_hf_model(kind: str):
    """(HF model, tokenizer): a full CLIP or SigLIP model, or a text-only one, with the tokenizer's ids."""
    tok = tiny_clip_tokenizer()
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    ids["pad_token_id"] = tok.pad_token_id
    torch.manual_seed(0)
    if kind == "clip":
        config = T.CLIPConfig(text_config={**TEXT, **ids}, vision_config=VISION, projection_dim=16)
        model = T.CLIPModel(config)
    elif kind == "clip_text_model":
        model = T.CLIPTextModel(T.CLIPTextConfig(**TEXT, **ids))
    elif kind == "siglip":
        config = T.SiglipConfig(text_config={**TEXT, **ids, "projection_size": 32}, vision_config=VISION)
        model = T.SiglipModel(config)
    else:
        model = T.SiglipTextModel(T.SiglipTextConfig(**TEXT, **ids, projection_size=32))
    return perturbed(model), tok


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(kind: str):
        if kind not in cache:
            model, tok = tiny_hf_model(kind)
            folder = tmp_path_factory.mktemp(kind)
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            cache[kind] = (model, tok, folder)
        return cache[kind]

    return get


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("kind", ["clip", "clip_text_model", "siglip", "siglip_text_model"])
def test_text_tower_matches_transformers(saved, kind):
    model, tok, folder = saved(kind)
    tower = load_text_tower(str(folder))
    ids = tower.tokenize(PROMPTS)  # [n, context]
    ref_ids = tok(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ids, ref_ids)
    text_model = model.text_model if kind in ("clip", "siglip") else model
    with torch.no_grad():
        ref = text_model(input_ids=torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    ours = tower.outputs(ids)
    assert len(ours["hidden_states"]) == len(ref.hidden_states) == 3
    assert _max_diff(ours["hidden_states"][1], ref.hidden_states[1]) <= 1e-4  # one intermediate layer
    assert _max_diff(ours["last_hidden_state"], ref.last_hidden_state) <= 1e-4
    if kind.startswith("clip"):
        assert _max_diff(ours["pooled"], ref.pooler_output) <= 1e-4
    if kind in ("clip", "siglip"):  # the joint-space embedding: get_text_features
        with torch.no_grad():
            ref_emb = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))).pooler_output
    elif kind == "siglip_text_model":  # its pooler output is the head's projection
        ref_emb = ref.pooler_output
    else:  # no projection: the embedding is the pooled token
        ref_emb = ref.pooler_output
    assert ours["embedding"].shape == ref_emb.shape
    assert _max_diff(ours["embedding"], ref_emb) <= 1e-4
    # encode() batches, pads to the batch size and trims: the same embeddings in any batching
    assert _max_diff(tower.encode(PROMPTS, batch_size=2), ref_emb) <= 1e-4


def test_text_tower_of_a_vision_checkpoint_is_refused(tmp_path):
    T.ViTModel(T.ViTConfig(**VISION)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'vit' has no text tower"):
        load_text_tower(str(tmp_path))


def test_missing_tokenizer_says_what_to_do(saved, tmp_path):
    model, _, _ = saved("clip_text_model")
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="save the model's tokenizer there"):
        load_text_tower(str(tmp_path))


def test_bfloat16_text_tower_is_close(saved):
    _, _, folder = saved("clip")
    full = load_text_tower(str(folder)).encode(PROMPTS)
    half = load_text_tower(str(folder), dtype="bfloat16", param_dtype="bfloat16").encode(PROMPTS).astype(np.float32)
    cosine = np.sum(full * half, -1) / np.linalg.norm(full, axis=-1) / np.linalg.norm(half, axis=-1)
    assert np.all(cosine > 0.99), cosine
