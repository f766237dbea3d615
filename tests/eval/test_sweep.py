"""Many linear heads in one pass (vitssl.eval.sweep): each head equals one trained alone with torch.optim.SGD,
the single-variant wd-0 grid equals the lr sweep of vitssl.eval.linear, feature variants, streaming."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitssl.eval import linear
from vitssl.eval.store import ShardedRows
from vitssl.eval.sweep import format_sweep_table, layer_variants, train_linear_sweep

C, PART = 5, 8  # classes; width of one "block" of a last2avg-like layer (3 parts: 2 class tokens + pooled)


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    centres = np.random.default_rng(0).standard_normal((C, 3 * PART))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    x = centres[y] + 1.3 * rng.standard_normal((n, 3 * PART)) + 3.0
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def data():
    return (*_data(400, 1), *_data(150, 2))


def _one_head_alone(x, y, fit, cols, lr, wd, epochs, batch, seed, variant_index):
    """The reference: BatchNorm1d(affine=False) + one linear head, torch.optim.SGD(momentum 0.9, weight_decay),
    per-iteration cosine (LambdaLR), on the batches the grid draws (same generator use)."""
    gen = torch.Generator().manual_seed(seed)
    inits = [torch.randn(C, n, generator=gen) * 0.01 for n in variant_index["widths"]]
    w = torch.nn.Parameter(inits[variant_index["index"]].clone())
    b = torch.nn.Parameter(torch.zeros(C))
    bn = torch.nn.BatchNorm1d(x.shape[1], affine=False, eps=1e-6)
    opt = torch.optim.SGD([w, b], lr=lr, momentum=0.9, weight_decay=wd)
    steps = len(fit) // batch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / (epochs * steps))))
    xf, yf = torch.from_numpy(x[fit]), torch.from_numpy(y[fit])
    for _ in range(epochs):
        order = torch.randperm(len(fit), generator=gen)
        for s in range(steps):
            rows = order[s * batch : (s + 1) * batch]
            loss = F.cross_entropy(bn(xf[rows])[:, cols] @ w.T + b, yf[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return w.detach(), b.detach()


def test_every_head_equals_one_trained_alone_with_torch_sgd(data):
    x, y, xv, yv = data
    variants = layer_variants("last2avg", 3 * PART)
    assert list(variants) == ["cls1", "cls1+avg", "cls2", "cls2+avg"]
    assert variants["cls1"].tolist() == list(range(PART, 2 * PART))
    assert variants["cls2+avg"].tolist() == list(range(3 * PART))
    result = train_linear_sweep(x, y, xv, yv, C, lrs=(0.05, 0.5), wds=(0.0, 0.01), variants=variants, epochs=3,
                                batch_size=32, seed=3)  # fmt: skip
    assert len(result["table"]) == 16 and {r["variant"] for r in result["table"]} == set(variants)
    fit, _ = linear.stratified_holdout(y, 0.1, 3)
    best = result["best"]
    where = {"widths": [len(c) for c in variants.values()], "index": list(variants).index(best["variant"])}
    cols = torch.from_numpy(variants[best["variant"]])
    w, b = _one_head_alone(x, y, fit, cols, best["lr"], best["wd"], 3, 32, 3, where)
    torch.testing.assert_close(result["head_state"]["weight"], w, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result["head_state"]["bias"], b, rtol=1e-4, atol=1e-6)
    held = [r["holdout_top1"] for r in result["table"]]
    assert best["holdout_top1"] == max(h for h, r in zip(held, result["table"]) if not r["diverged"])
    assert result["top1"] == pytest.approx(best["val_top1"])  # the chosen head, reported on val
    assert "<- best" in format_sweep_table(result)
    json_ready = linear.result_to_json(result)
    assert "head_state" not in json_ready and len(json_ready["table"]) == 16


def test_one_variant_without_weight_decay_is_the_lr_sweep_of_the_linear_probe(data):
    x, y, xv, yv = data
    lrs = (0.03, 0.3, 3.0)
    sweep = train_linear_sweep(x, y, xv, yv, C, lrs=lrs, epochs=4, batch_size=64, seed=1)
    probe = linear.train_linear_probe(x, y, xv, yv, C, lrs=lrs, epochs=4, batch_size=64, seed=1)
    assert [r["holdout_top1"] for r in sweep["table"]] == pytest.approx([r["holdout_top1"] for r in probe["sweep"]])
    assert sweep["best"]["lr"] == probe["best_value"] and sweep["top1"] == pytest.approx(probe["top1"])
    torch.testing.assert_close(sweep["head_state"]["weight"], probe["head_state"]["weight"], rtol=1e-4, atol=1e-6)


class _NoWholeCopy(ShardedRows):
    def __array__(self, dtype=None, copy=None):
        raise AssertionError("the features were read whole")


def test_streamed_training_reads_the_store_block_by_block(data, tmp_path):
    x, y, xv, yv = data
    parts = []
    for i, (a, b) in enumerate(((0, 170), (170, 400))):  # two float16 shards, as a store holds them
        np.save(tmp_path / f"p{i}.npy", x[a:b].astype(np.float16))
        parts.append(np.load(tmp_path / f"p{i}.npy", mmap_mode="r"))
    view = _NoWholeCopy(parts)
    streamed = train_linear_sweep(view, y, xv, yv, C, lrs=(0.1, 1.0), epochs=6, batch_size=32, resident_bytes=0,
                                  block_rows=64)  # fmt: skip
    resident = train_linear_sweep(view, y, xv, yv, C, lrs=(0.1, 1.0), epochs=6, batch_size=32)
    assert streamed["streamed"] and not resident["streamed"]
    chance = 100 / C
    assert streamed["top1"] > 2 * chance and resident["top1"] > 2 * chance
    assert abs(streamed["top1"] - resident["top1"]) < 10


def test_bad_settings_name_the_problem(data):
    x, y, xv, yv = data
    with pytest.raises(linear.ProbeError, match="holds out no rows"):
        train_linear_sweep(x, y, xv, yv, C, lrs=(0.1, 1.0), holdout_fraction=0.0, epochs=1)
    with pytest.raises(ValueError, match="lrs must be positive and wds non-negative"):
        train_linear_sweep(x, y, xv, yv, C, lrs=(0.1,), wds=(-1.0,), epochs=1)
    with pytest.raises(ValueError, match="do not split into 5 equal parts"):
        layer_variants("last4avg", 24)
    assert list(layer_variants("pooled", 7)) == ["all"] and list(layer_variants("last3", 9)) == ["cls1", "cls3"]
