"""Resolving backbones: Hub ids through huggingface_hub's cache (offline here), local folders, and the errors."""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fxjax  # noqa: E402
from fxjax import config as config_lib  # noqa: E402
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


def _serve_hub(monkeypatch, repo: Path, snapshot: Path) -> list[dict]:
    """The Hub, online, holding the files of `repo`: `model_info` lists them; `snapshot_download`, called as the
    real one accepts (its signature), copies the files its allow_patterns select (huggingface_hub's own filter)
    into `snapshot`. → the calls' arguments."""
    import inspect
    import shutil
    from types import SimpleNamespace

    import huggingface_hub as hf
    from huggingface_hub.utils import filter_repo_objects

    signature, calls = inspect.signature(hf.snapshot_download), []

    class FakeApi:
        def model_info(self, repo_id, revision=None):
            return SimpleNamespace(sha=SHA, siblings=[SimpleNamespace(rfilename=p.name) for p in repo.iterdir()])

    def snapshot_download(*args, **kwargs):
        call = signature.bind(*args, **kwargs).arguments
        calls.append(call)
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in filter_repo_objects([p.name for p in repo.iterdir()], allow_patterns=call["allow_patterns"]):
            shutil.copy(repo / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    return calls


def test_hub_download_of_a_clip_repo_fetches_its_tokenizer(tmp_path, monkeypatch):
    from fxjax.backbones.text import load_text_tower
    from tests.backbones.test_text_towers import tiny_hf_model

    model, tok = tiny_hf_model("clip")
    repo = tmp_path / "repo"
    model.save_pretrained(repo)
    tok.save_pretrained(repo)
    (repo / "README.md").write_text("not needed")
    (repo / "pytorch_model.bin").write_bytes(b"the other format: not fetched")
    calls = _serve_hub(monkeypatch, repo, tmp_path / "snapshot")
    tower = load_text_tower("tiny-org/tiny-clip")
    assert calls[0]["repo_id"] == "tiny-org/tiny-clip" and calls[0]["revision"] == SHA
    assert {"model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"} <= set(calls[0]["allow_patterns"])
    fetched = {p.name for p in (tmp_path / "snapshot").iterdir()}
    assert fetched == {p.name for p in repo.iterdir()} - {"README.md", "pytorch_model.bin"}
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= fetched
    ids = tower.tokenize(["a photo of a cat."])
    with torch.no_grad():
        ref = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    ref = getattr(ref, "pooler_output", ref).numpy()  # transformers 5 may return an output object
    np.testing.assert_allclose(tower.encode(["a photo of a cat."]), ref, atol=1e-4)


def test_hub_download_of_an_open_clip_repo_fetches_open_clips_files(tmp_path, monkeypatch):
    pytest.importorskip("open_clip")
    from open_clip.tokenizer import default_bpe

    from fxjax.backbones.text import load_text_tower
    from fxjax.evaluate.zeroshot import check_text_tower
    from tests.backbones.test_open_clip import TINY, _model, _save

    model, _ = _model("fxjax-tiny-hub", TINY)
    repo = _save(model, TINY, tmp_path / "repo")
    Path(repo / "bpe_simple_vocab_16e6.txt.gz").write_bytes(Path(default_bpe()).read_bytes())
    (repo / "config.json").write_text(json.dumps({"model_type": "clip"}))  # LAION repos carry both formats
    (repo / "model.safetensors").write_bytes(b"transformers' copy: not fetched")
    calls = _serve_hub(monkeypatch, repo, tmp_path / "snapshot")
    backbone = fxjax.load_backbone("laion-like/tiny")
    tower = load_text_tower("laion-like/tiny")  # its BPE vocabulary from beside the weights
    patterns = set(calls[0]["allow_patterns"])
    assert {"open_clip_config.json", "open_clip_model.safetensors", "bpe_simple_vocab_16e6.txt.gz"} <= patterns
    assert "model.safetensors" not in patterns
    assert backbone.info["model_type"] == "open_clip" and backbone.info["revision"] == SHA
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref_image = model.encode_image(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
        ref_text = model.encode_text(torch.from_numpy(tower.tokenize(["a cat"]).astype(np.int64))).numpy()
    np.testing.assert_allclose(np.asarray(backbone.outputs(x)["embedding"]), ref_image, atol=1e-4)
    np.testing.assert_allclose(tower.encode(["a cat"]), ref_text, atol=1e-4)
    # What a run's zero-shot probe scores: the "embedding" variant, unit norm; the run accepts this backbone.
    normed = ref_image / np.linalg.norm(ref_image, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(backbone.variants(x, ("embedding",))["embedding"]), normed, atol=1e-5)
    config = config_lib.default_config()
    config.backbone, config.probes = "laion-like/tiny", ("zeroshot",)
    check_text_tower(config)
