"""Resolving backbones: Hub ids through huggingface_hub's cache (offline here), local folders, and the errors."""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fxjax  # noqa: E402
from fxjax.backbones import hub  # noqa: E402

SHA = "0123456789abcdef0123456789abcdef01234567"


def _tiny_vit(folder: Path) -> None:
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8
    )
    torch.manual_seed(0)
    transformers.ViTModel(config, add_pooling_layer=False).eval().save_pretrained(folder)


def _fake_hub_cache(root: Path, repo_id: str) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SHA
    _tiny_vit(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    return snapshot


def test_a_cached_hub_id_loads_offline_and_records_its_commit(tmp_path, monkeypatch):
    snapshot = _fake_hub_cache(tmp_path, "tiny-org/tiny-vit")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    bb = fxjax.load_backbone("tiny-org/tiny-vit")
    assert bb.info["revision"] == SHA and bb.info["model_type"] == "vit"
    assert bb.info["weight_files"] == [str(snapshot / "model.safetensors")]
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    outs = bb.outputs(x)
    np.testing.assert_array_equal(np.asarray(outs["pooled"]), np.asarray(bb.features(x)))
    assert outs["patch_tokens"].shape == (2, 4, 32) and len(outs["hidden_states"]) == 2


def test_offline_and_not_cached_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"not in the Hugging Face cache .*hf download nobody/nothing"):
        fxjax.load_backbone("nobody/nothing")


def test_unknown_hub_id_is_named(monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    class FakeApi:  # the Hub's own answer for a repository that does not exist
        def model_info(self, repo_id, revision=None):
            err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
            Exception.__init__(err, f"404 for {repo_id}")
            raise err

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    with pytest.raises(FileNotFoundError, match="unknown model id 'nobody/nothing' on the Hugging Face Hub"):
        fxjax.load_backbone("nobody/nothing")


def test_safetensors_preferred_over_pytorch_bin(tmp_path):
    _tiny_vit(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"never read")
    assert hub.weight_files(tmp_path).name == "model.safetensors"


def test_unknown_names_and_empty_folders(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'resnet-9000'"):
        fxjax.load_backbone("resnet-9000")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(FileNotFoundError, match="no weight file found"):
        fxjax.load_backbone(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        fxjax.load_backbone(str(tmp_path / "missing"))
