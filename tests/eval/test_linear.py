"""Linear probes on cached features (vitssl.eval.linear): SGD lr sweep in one pass vs scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitssl.errors import UserError
from vitssl.eval import linear
from vitssl.eval.metrics import save_confusion_png

C, D = 6, 32


def _blobs(n: int, seed: int, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class blobs; centres are shared by every call (seed 0), samples depend on ``seed``."""
    centres = np.random.default_rng(0).standard_normal((C, D)) * 1.2
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n)
    feats = centres[labels] + spread * rng.standard_normal((n, D)) + 5.0  # offset: BatchNorm has work to do
    return feats.astype(np.float32), labels


@pytest.fixture(scope="module")
def blobs():
    return (*_blobs(600, seed=1), *_blobs(300, seed=2))


@pytest.fixture(scope="module")
def sgd_result(blobs):
    return linear.train_linear_probe(*blobs, num_classes=C, epochs=15, batch_size=64, seed=0)


def test_sgd_probe_matches_logistic_regression_on_separable_data(blobs, sgd_result):
    lr_result = linear.logistic_regression_probe(*blobs, num_classes=C, Cs=(0.1, 1.0))
    assert sgd_result["top1"] >= 95 and lr_result["top1"] >= 95
    assert abs(sgd_result["top1"] - lr_result["top1"]) <= 3
    for result in (sgd_result, lr_result):
        assert result["top5"] >= result["top1"]
        assert result["confusion_matrix"].shape == (C, C) and result["confusion_matrix"].sum() == 300


def test_default_sweep_is_batch_scaled_and_trained_in_one_module(sgd_result):
    assert [s["value"] for s in sgd_result["sweep"]] == pytest.approx([b * 64 / 256 for b in linear.DEFAULT_BASE_LRS])
    assert abs(sgd_result["num_holdout"] - 60) <= C and sgd_result["num_fit"] + sgd_result["num_holdout"] == 600
    head = sgd_result["head_state"]
    assert head["weight"].shape == (C, D) and head["bias"].shape == (C,) and head["bn.running_mean"].shape == (D,)


def test_lr_is_picked_on_the_holdout(blobs):
    # lr 1e-6 cannot move the heads in 3 epochs, inf makes its head non-finite: 0.1 must win on the holdout.
    result = linear.train_linear_probe(*blobs, num_classes=C, lrs=(1e-6, 0.1, float("inf")), epochs=3, batch_size=64)
    holdout = {s["value"]: s["holdout_top1"] for s in result["sweep"]}
    assert holdout[1e-6] < 60 and holdout[0.1] > 90
    assert result["sweep"][2]["diverged"] and not result["sweep"][1]["diverged"]
    assert result["best_value"] == 0.1


def test_the_choice_follows_the_holdout_not_val():
    """Val labels contradict train: the choice must still be the lr that is best on the held-out train rows."""
    x, y = _blobs(400, seed=3)
    xv, yv = _blobs(200, seed=4)
    result = linear.train_linear_probe(x, y, xv, (yv + 1) % C, num_classes=C, lrs=(1e-6, 0.1), epochs=3, batch_size=64)
    assert result["best_value"] == 0.1 and result["top1"] < 10


def test_probe_is_deterministic_given_the_seed(blobs):
    a = linear.train_linear_probe(*blobs, num_classes=C, lrs=(0.05, 0.5), epochs=2, batch_size=64, seed=7)
    b = linear.train_linear_probe(*blobs, num_classes=C, lrs=(0.05, 0.5), epochs=2, batch_size=64, seed=7)
    c = linear.train_linear_probe(*blobs, num_classes=C, lrs=(0.05, 0.5), epochs=2, batch_size=64, seed=8)
    assert a["sweep"] == b["sweep"] and a["top1"] == b["top1"]
    assert torch.equal(a["head_state"]["weight"], b["head_state"]["weight"])
    assert not torch.equal(a["head_state"]["weight"], c["head_state"]["weight"])


def test_heads_are_independent(blobs):
    """A head trained alone equals the same head trained beside others (one pass, separate param groups)."""
    alone = linear.train_linear_probe(*blobs, num_classes=C, lrs=(0.1,), epochs=2, batch_size=64, seed=1)
    swept = linear.train_linear_probe(*blobs, num_classes=C, lrs=(0.1, 0.01), epochs=2, batch_size=64, seed=1)
    assert swept["best_value"] == 0.1
    torch.testing.assert_close(alone["head_state"]["weight"], swept["head_state"]["weight"], rtol=1e-5, atol=1e-6)


def test_stratified_holdout_keeps_class_shares():
    labels = np.repeat(np.arange(4), [100, 50, 20, 10])
    fit, hold = linear.stratified_holdout(labels, 0.1, seed=0)
    assert np.bincount(labels[hold]).tolist() == [10, 5, 2, 1]
    assert len(np.intersect1d(fit, hold)) == 0 and len(fit) + len(hold) == len(labels)
    assert np.array_equal(hold, linear.stratified_holdout(labels, 0.1, seed=0)[1])


def test_confusion_matrix_and_png(tmp_path, sgd_result, blobs):
    # Recompute val predictions from the returned head: BatchNorm with running statistics, then the linear layer.
    head, xv, yv = sgd_result["head_state"], torch.from_numpy(blobs[2]), blobs[3]
    normed = (xv - head["bn.running_mean"]) / torch.sqrt(head["bn.running_var"] + 1e-6)
    pred = (normed @ head["weight"].T + head["bias"]).argmax(1).numpy()
    cm = sgd_result["confusion_matrix"]
    expected = np.zeros((C, C), dtype=np.int64)
    np.add.at(expected, (yv, pred), 1)
    np.testing.assert_array_equal(cm, expected)
    assert cm.trace() / cm.sum() * 100 == pytest.approx(sgd_result["top1"])
    out = save_confusion_png(cm, [f"class {i}" for i in range(C)], tmp_path / "cm" / "confusion.png")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 100
    as_json = linear.result_to_json(sgd_result)
    assert "head_state" not in as_json and as_json["confusion_matrix"] == cm.tolist()
    json.dumps(as_json)
    with pytest.raises(ValueError, match="3 names but the confusion matrix has 6"):
        save_confusion_png(cm, ["a", "b", "c"], tmp_path / "x.png")


def test_logistic_regression_sweep_reports_every_c(blobs):
    result = linear.logistic_regression_probe(*blobs, num_classes=C, Cs=(1e-4, 1.0))
    assert [s["value"] for s in result["sweep"]] == [1e-4, 1.0]
    assert result["best_value"] == 1.0 and result["sweep"][0]["holdout_top1"] < result["sweep"][1]["holdout_top1"]
    assert "lr" not in result and result["param"] == "C"


def test_bad_inputs_name_the_problem(blobs):
    x, y, xv, yv = blobs
    assert issubclass(linear.ProbeError, UserError) and issubclass(linear.ProbeError, ValueError)
    with pytest.raises(ValueError, match=r"train_labels must lie in \[0, 3\)"):
        linear.train_linear_probe(x, y, xv, yv, num_classes=3, epochs=1)
    with pytest.raises(linear.ProbeError, match="holds out no training rows"):  # a UserError: one line, no trace
        linear.train_linear_probe(x, y, xv, yv, num_classes=C, holdout_fraction=0.0, epochs=1)
    with pytest.raises(linear.ProbeError, match=r"every head diverged .* try smaller learning rates"):
        linear.train_linear_probe(x, y, xv, yv, num_classes=C, lrs=(float("inf"),), holdout_fraction=0.0, epochs=1)
    with pytest.raises(ValueError, match="val_feats have dimension 8"):
        linear.train_linear_probe(x, y, xv[:, :8], yv, num_classes=C, epochs=1)
