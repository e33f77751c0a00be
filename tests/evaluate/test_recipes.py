"""Named protocols against their references: DINOv2's own KnnModule, scikit-learn's logistic regression at the
chosen C, big_vision's closed form written out in numpy; plus the settings, selection and result contract."""

import enum
import json
import sys

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from fxjax.evaluate import recipes, results, search
from tests.support.dinov2_eval import stubbed


def _blobs(n, d=16, c=6, seed=0, noise=2.0):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(c, d))
    y = rng.integers(0, c, n)
    return (centers[y] + noise * rng.normal(size=(n, d))).astype(np.float32), y


@pytest.fixture(scope="module")
def splits():
    return _blobs(300, seed=0), _blobs(100, seed=1), _blobs(200, seed=2)


def _dinov2_knn_module():
    """dinov2.eval.knn imports its data/metrics/setup stack (torchmetrics, omegaconf, ...) only for the CLI;
    KnnModule needs torch and dinov2.distributed. Stub the unused imports, keep their code."""

    class AccuracyAveraging(enum.Enum):
        MEAN_ACCURACY = "micro"

    stubs = {
        "dinov2.data": {"SamplerType": None, "make_data_loader": None, "make_dataset": None},
        "dinov2.data.transforms": {"make_classification_eval_transform": None},
        "dinov2.eval.metrics": {"AccuracyAveraging": AccuracyAveraging, "build_topk_accuracy_metric": None},
        "dinov2.eval.setup": {"get_args_parser": None, "setup_and_build_model": None},
        "dinov2.eval.utils": {"ModelWithNormalize": None, "evaluate": None, "extract_features": None},
    }
    with stubbed(stubs):
        sys.modules.pop("dinov2.eval.knn", None)
        from dinov2.eval import knn
    return knn.KnnModule


def test_dinov2_knn_matches_dinov2(splits, tmp_path):
    import torch
    import torch.distributed as dist

    (tx, ty), _, (sx, sy) = splits
    knn_module = _dinov2_knn_module()
    ks = (10, 20, 100, 200)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:

        def normalize(x):
            return torch.nn.functional.normalize(torch.from_numpy(x).double(), dim=1, p=2)

        module = knn_module(normalize(tx), torch.from_numpy(ty), list(ks), 0.07, torch.device("cpu"), num_classes=6)
        with torch.no_grad():
            ref = {k: v.numpy() for k, v in module(normalize(sx)).items()}
    finally:
        dist.destroy_process_group()
    ours = recipes.knn_scores(tx, ty, sx, 6, ks, 0.07, chunk=64)  # [K, m, c]
    for i, k in enumerate(ks):
        np.testing.assert_allclose(ours[i], ref[k], atol=2e-5)
        assert np.array_equal(ours[i].argmax(-1), ref[k].argmax(-1)), k
    res = recipes.run("dinov2_knn", (tx, ty), (sx, sy), 6)
    assert res.selection == {"param": "k", "value": 20, "on": "fixed", "note": res.selection["note"]}
    assert [r["k"] for r in res.rows] == list(ks)
    assert res.metrics["top1"]["value"] == pytest.approx(np.mean(ref[20].argmax(-1) == sy))


def test_dinov2_knn_selects_k_on_val_when_asked(splits):
    (tx, ty), (vx, vy), (sx, sy) = splits
    res = recipes.run("dinov2_knn", (tx, ty), (sx, sy), 6, (vx, vy), select_k_on_val=True, ks=(1, 10, 50))
    best = max(res.rows, key=lambda r: r["val_top1"])
    assert res.selection["on"] == "val" and res.selection["value"] == best["k"]
    assert res.metrics["top1"]["value"] == pytest.approx(best["top1"])


def _sklearn_objective(x, y, w, b, c):
    """sklearn's multinomial objective divided by n: mean CE + ||W||^2 / (2 C n), intercept unpenalised."""
    logits = x.astype(np.float64) @ w + b
    logits -= logits.max(1, keepdims=True)
    ce = np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(len(y)), y])
    return ce + np.sum(w**2) / (2 * c * len(y))


def _check_final_fit_against_sklearn(res, train, val, test, c):
    x, y = np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]])
    ref = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(x, y)
    ref_top1 = ref.score(*test)
    assert abs(res.metrics["top1"]["value"] - ref_top1) <= 0.003 + 1e-12
    ref_obj = _sklearn_objective(x, y, ref.coef_.T, ref.intercept_, c)
    assert res.splits["final_objective"] == pytest.approx(ref_obj, rel=1e-3)


def test_dinov2_logreg_grid_selection_and_sklearn(splits):
    train, val, test = splits
    res = recipes.run("dinov2_logreg", train, test, 6, val)
    table = res.selection["table"]
    np.testing.assert_allclose([r["C"] for r in table], 10.0 ** np.linspace(-6, 5, 45))
    top1 = [r["top1"] for r in table]
    assert res.selection["on"] == "val" and res.selection["value"] == table[int(np.argmax(top1))]["C"]
    assert res.splits["fit_on"] == "train+val" and res.splits["train"] == 300 and res.splits["selection"] == 100
    _check_final_fit_against_sklearn(res, train, val, test, res.selection["value"])


def test_dinov2_logreg_without_val_holds_out_a_seeded_tenth(splits):
    train, _, test = splits
    a = recipes.run("dinov2_logreg", train, test, 6, c_powers=(-2.0, 2.0, 5))
    b = recipes.run("dinov2_logreg", train, test, 6, c_powers=(-2.0, 2.0, 5))
    assert a.selection["on"] == "train_holdout" and (a.splits["train"], a.splits["selection"]) == (270, 30)
    assert a.selection["value"] == b.selection["value"] and a.metrics == b.metrics
    assert a.splits["fit_on"] == "train+train_holdout"


def test_clip_linear_probe_walk_and_sklearn(splits):
    train, val, test = splits
    res = recipes.run("clip_linear_probe", train, test, 6, val)
    lambdas = search.log_grid(-6, 6, 8)
    curve = {r["lambda"]: r["top1"] for r in res.selection["table"]}
    best, asked = search.coarse_to_fine(lambda i: curve[float(lambdas[i])], lambdas.size)
    assert res.selection["visited"] == [float(lambdas[i]) for i in asked]
    assert res.selection["value"] == float(lambdas[best])
    assert len(curve) < 30  # a walk, not the 97-point grid
    _check_final_fit_against_sklearn(res, train, val, test, res.selection["C"])


def _bigvision_reference(x, y, tx, shots, seed, l2, c=6):
    """big_vision fewshot_lsr.py's computation, written out in numpy."""
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(np.where(y == k)[0])[:shots] for k in range(c)])
    xs, ys = x[idx].astype(np.float64), y[idx]
    mean, std = xs.mean(0, keepdims=True), xs.std(0, keepdims=True) + 1e-5
    a = np.pad((xs - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)
    t = 2.0 * np.eye(c)[ys] - 1.0
    w = np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ t)
    return np.pad((tx - mean) / std, ((0, 0), (0, 1)), constant_values=100.0) @ w


def test_bigvision_fewshot_matches_big_vision(splits):
    (tx, ty), _, (sx, sy) = splits
    res = recipes.run("bigvision_fewshot", (tx, ty), (sx, sy), 6, shots=(1, 5, 10, 25), seeds=(0, 1, 2))
    assert res.settings["l2_reg"] == 2.0**10
    for shots in (1, 5, 10, 25):
        accs = [np.mean(_bigvision_reference(tx, ty, sx, shots, s, 2.0**10).argmax(-1) == sy) for s in (0, 1, 2)]
        entry = res.metrics[f"top1@{shots}shot"]
        assert entry["per_seed"] == pytest.approx(accs)
        assert entry["value"] == pytest.approx(np.mean(accs)) and entry["std"] == pytest.approx(np.std(accs))
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]


def test_bigvision_fewshot_loo_selection_uses_shots_only(splits):
    (tx, ty), _, (sx, sy) = splits
    res = recipes.run("bigvision_fewshot", (tx, ty), (sx, sy), 6, shots=(1, 5), seeds=(0,), select="loo")
    one, five = res.rows
    assert [s["on"] for s in one["selections"]] == ["fixed"]
    assert [s["on"] for s in five["selections"]] == ["loo"] and "30 few-shot examples" in five["selections"][0]["note"]


def test_fewshot_logistic_kfold(splits):
    (tx, ty), _, (sx, sy) = splits
    # 2 shots, 2 folds: each fold trains on 1 shot per class, the shape of the 1-shot fit (one compile fewer).
    res = recipes.run("fewshot_logistic", (tx, ty), (sx, sy), 6, shots=(1, 2), seeds=(0,), Cs=(0.01, 1.0), folds=2)
    assert [r["selections"][0]["on"] for r in res.rows] == ["fixed", "kfold"]
    assert res.rows[1]["selections"][0]["value"] in (0.01, 1.0)
    assert res.rows[1]["selections"][0]["note"] == "2-fold over the 12 few-shot examples"
    assert 0.25 < res.metrics["top1@2shot"]["value"] <= 1.0  # chance is 1/6


def test_settings_are_checked_and_results_serialise(splits, tmp_path):
    train, _, test = splits
    with pytest.raises(ValueError, match="unknown setting 'temprature'"):
        recipes.run("dinov2_knn", train, test, 6, temprature=0.1)
    with pytest.raises(ValueError, match="unknown protocol 'knn'"):
        recipes.run("knn", train, test, 6)
    with pytest.raises(ValueError, match="select_metric='top2'"):
        recipes.run("dinov2_logreg", train, test, 6, select_metric="top2")
    res = recipes.run("dinov2_knn", train, test, 6, ks=(5, 20), temperature=0.1)
    assert res.settings["temperature"] == 0.1 and res.settings["ks"] == (5, 20)
    res.labels = {"backbone": "tiny", "dataset": "blobs"}
    results.write_json([res], tmp_path / "r.json")
    loaded = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert loaded["protocol"] == "dinov2_knn" and loaded["metrics"]["top1"]["value"] == res.metrics["top1"]["value"]
    table = results.markdown_table([res])
    assert table.splitlines()[0].startswith("| backbone | dataset | protocol | chosen | top1")
    assert "| tiny | blobs | dinov2_knn | k=20 (fixed) |" in table


def test_suite_configs_name_registered_protocols():
    from configs.suites import clip_benchmark, offline, vtab1k
    from fxjax.evaluate.linear_specs import LINEAR_SPECS

    for module in (offline, vtab1k, clip_benchmark):
        config = module.get_config()
        assert set(config.protocols) <= set(recipes.PROTOCOLS) | set(LINEAR_SPECS), module.__name__
        assert config.backbones and config.datasets
        for name, overrides in config.overrides.items():
            assert set(overrides) <= set(recipes.PROTOCOLS[name].defaults), (module.__name__, name)


def test_logistic_path_keeps_the_order_of_cs(splits):
    from fxjax.evaluate import probes

    (tx, ty), _, _ = splits
    cs = [10.0, 0.01, 1.0]
    path = probes.logistic_path(tx, ty, 6, cs)
    for c, fit in zip(cs, path):
        alone = probes.logistic_fit(tx, ty, 6, C=c)
        assert fit.objective == pytest.approx(alone.objective, rel=1e-4), c
    assert path[1].objective > path[2].objective > path[0].objective  # more regularisation, higher objective
