"""TransTrack: the Hungarian matcher and set loss against brute force, the model on every pyramid family, the
training pairs, and a tiny ``vitssl train video/transtrack_demo`` followed by ``vitssl track run``."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import vitssl.video.registered  # noqa: F401  (registers transtrack and mot_pairs)
from vitssl.backbones import create_backbone
from vitssl.config import ConfigError
from vitssl.video.track.data import TrackPairTransform, normalised_boxes
from vitssl.video.track.matcher import SetLossWeights, hungarian_match, match_cost, set_loss
from vitssl.video.track.objective import TransTrackConfig, TransTrackObjective

S = 32  # test image side

# ------------------------------------------------------------------------------------------ brute-force references


def _np_giou(a: np.ndarray, b: np.ndarray) -> float:
    """GIoU of two (cx, cy, w, h) boxes, written out by hand."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _np_focal(logit: float, target: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    ce = -(target * math.log(p) + (1 - target) * math.log(1 - p))
    p_t = p * target + (1 - p) * (1 - target)
    return (alpha * target + (1 - alpha) * (1 - target)) * ce * (1 - p_t) ** gamma


def _np_cost(logits: np.ndarray, boxes: np.ndarray, labels: np.ndarray, tgt: np.ndarray, w: SetLossWeights) -> float:
    """One pair's matching cost, element by element."""
    if w.focal:
        p = 1 / (1 + math.exp(-logits[labels]))
        cls = w.alpha * (1 - p) ** w.gamma * -math.log(p + 1e-8) - (1 - w.alpha) * p**w.gamma * -math.log(1 - p + 1e-8)
    else:
        e = np.exp(logits - logits.max())
        cls = -(e / e.sum())[labels]
    return w.cls * cls + w.l1 * np.abs(boxes - tgt).sum() - w.giou * _np_giou(boxes, tgt)


def _brute_force(cost: np.ndarray) -> float:
    """The least total cost over every injective assignment of the smaller side into the larger."""
    n, m = cost.shape
    if n >= m:
        return min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))
    return min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))


def _random_case(rng: np.random.Generator, n: int, m: int, k: int) -> tuple:
    logits = torch.as_tensor(rng.normal(0, 2, (n, k)), dtype=torch.float64)
    boxes = torch.as_tensor(np.c_[rng.uniform(0.2, 0.8, (n, 2)), rng.uniform(0.05, 0.4, (n, 2))])
    labels = torch.as_tensor(rng.integers(0, k - 1 if k > 1 else 1, m), dtype=torch.long)
    tgt = torch.as_tensor(np.c_[rng.uniform(0.2, 0.8, (m, 2)), rng.uniform(0.05, 0.4, (m, 2))])
    return logits, boxes, labels, tgt


@pytest.mark.parametrize("focal", [True, False])
def test_matching_cost_and_assignment_match_brute_force(focal: bool) -> None:
    rng = np.random.default_rng(0)
    w = SetLossWeights(focal=focal)
    for trial in range(30):
        n, m = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        logits, boxes, labels, tgt = _random_case(rng, n, m, k=3)
        cost = match_cost(logits, boxes, labels, tgt, w).numpy()  # (N, M)
        ref = np.array([[_np_cost(logits[i].numpy(), boxes[i].numpy(), int(labels[j]), tgt[j].numpy(), w)
                         for j in range(m)] for i in range(n)])  # fmt: skip
        np.testing.assert_allclose(cost, ref, rtol=1e-6, atol=1e-6, err_msg=f"trial {trial}")
        rows, cols = hungarian_match(logits, boxes, labels, tgt, w)
        assert len(rows) == min(n, m) and len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert cost[rows.numpy(), cols.numpy()].sum() == pytest.approx(_brute_force(ref), abs=1e-9)


def test_set_loss_matches_a_brute_force_reference() -> None:
    """Focal + L1 + GIoU over the best of all permutations, each term written out, normalised by the targets."""
    rng = np.random.default_rng(1)
    w = SetLossWeights()
    for _ in range(10):
        b, n, k = 2, 4, 1
        cases = [_random_case(rng, n, int(rng.integers(0, 4)), k) for _ in range(b)]
        logits = torch.stack([c[0] for c in cases]).requires_grad_(True)  # (B, N, K)
        boxes = torch.stack([c[1] for c in cases])  # (B, N, 4)
        targets = [(c[2], c[3]) for c in cases]
        out = set_loss(logits, boxes, targets, w)
        num = max(sum(len(c[2]) for c in cases), 1)
        cls = l1 = giou = 0.0
        for lg, bx, lab, tg in cases:
            m = len(lab)
            best, best_perm = np.inf, ()
            for perm in itertools.permutations(range(n), m):  # prediction perm[j] takes target j
                c = sum(
                    _np_cost(lg[p].numpy(), bx[p].numpy(), int(lab[j]), tg[j].numpy(), w) for j, p in enumerate(perm)
                )
                if c < best:
                    best, best_perm = c, perm
            onehot = np.zeros((n, k))
            for j, p in enumerate(best_perm):
                onehot[p, int(lab[j])] = 1.0
                l1 += np.abs(bx[p].numpy() - tg[j].numpy()).sum()
                giou += 1 - _np_giou(bx[p].numpy(), tg[j].numpy())
            cls += sum(_np_focal(float(lg[q, c]), onehot[q, c]) for q in range(n) for c in range(k))
        cls, l1, giou = cls / num, l1 / num, giou / num
        assert out["cls"].item() == pytest.approx(cls, rel=1e-6)
        assert out["l1"].item() == pytest.approx(l1, rel=1e-6, abs=1e-12)
        assert out["giou"].item() == pytest.approx(giou, rel=1e-6, abs=1e-12)
        assert out["loss"].item() == pytest.approx(2 * cls + 5 * l1 + 2 * giou, rel=1e-6)
        out["loss"].backward()
        assert torch.isfinite(logits.grad).all()


# ------------------------------------------------------------------------------------------------- model, objective


def _objective(backbone: str = "test_pvt_v2", **overrides: object) -> TransTrackObjective:
    fields = {"dim": 32, "num_queries": 8, "enc_layers": 1, "dec_layers": 2, "num_heads": 2, "ffn_dim": 64,
              "max_objects": 4, "dropout": 0.0, **overrides}  # fmt: skip
    cfg = OmegaConf.structured(TransTrackConfig(**fields))
    torch.manual_seed(0)
    return TransTrackObjective(cfg, lambda **kw: create_backbone(backbone, **{"img_size": S, **kw}))


def _batch(b: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2], [0, 0, 0, 0], [0, 0, 0, 0]]).expand(b, 4, 4)
    mask = torch.tensor([True, True, False, False]).expand(b, 4).clone()
    mask[1, 1] = False  # images hold different numbers of objects
    ids = torch.tensor([1, 2, -1, -1]).expand(b, 4)
    return {"prev": torch.randn(b, 3, S, S, generator=g), "cur": torch.randn(b, 3, S, S, generator=g),
            "prev_boxes": boxes.clone(), "prev_mask": mask, "prev_ids": ids,
            "cur_boxes": boxes + 0.02 * (boxes > 0), "cur_mask": mask, "cur_ids": ids}  # fmt: skip


@pytest.mark.parametrize(
    ("backbone", "two_stage"),
    [("test_pvt", False), ("test_pvt_v2", False), ("test_swin", False), ("test_vit", False), ("test_pvt_v2", True)],
)
def test_forward_on_every_pyramid_family_gives_a_finite_loss_and_every_parameter_a_gradient(
    backbone: str, two_stage: bool
) -> None:
    objective = _objective(backbone, two_stage=two_stage)
    expected_levels = 1 if backbone == "test_vit" else 2
    assert len(objective.model.levels) == expected_levels
    out = objective(_batch())
    assert out["loss"].ndim == 0 and math.isfinite(out["loss"].item())
    assert {"det_loss", "track_loss", "l1", "giou", "cls"} <= set(out)
    out["loss"].backward()
    missing = [n for n, p in objective.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    det, trk = objective.model(_batch()["cur"], _batch()["prev"])
    queries = 5 if two_stage else 8  # two-stage: at most one query per encoder token (2x2 + 1x1 at 32 px)
    assert det.boxes[-1].shape == (2, queries, 4) and det.logits[-1].shape == (2, queries, 1) and trk is None
    assert len(det.boxes) == 2  # one output per decoder layer (auxiliary losses)
    assert (det.enc_boxes is not None) == two_stage  # two-stage: the encoder's proposals, one per token
    q = det.embed[:, :3]  # three track queries with their boxes as reference
    model = objective.model
    trk = model.track(model.encode(model.features(_batch()["cur"]), model.features(_batch()["prev"])), q,
                      det.boxes[-1][:, :3])  # fmt: skip
    assert trk.boxes[-1].shape == (2, 3, 4) and ((trk.boxes[-1] > 0) & (trk.boxes[-1] < 1)).all()


def test_alternate_schedule_trains_one_decoder_per_step_with_every_parameter_in_the_graph() -> None:
    objective = _objective(decoders="alternate")
    seen = set()
    for _ in range(6):
        objective.zero_grad()
        out = objective(_batch())
        seen.add("det_loss" in out)
        assert ("det_loss" in out) != ("track_loss" in out)
        out["loss"].backward()
        assert all(p.grad is not None for p in objective.parameters() if p.requires_grad)
    assert seen == {True, False}


def test_backbone_gets_its_own_learning_rate_scale() -> None:
    objective = _objective(backbone_lr_scale=0.1)
    groups = objective.param_groups(0.05)
    backbone = {id(p) for p in objective.backbone.parameters()}
    for g in groups:
        in_backbone = {id(p) in backbone for p in g["params"]}
        assert len(in_backbone) == 1
        assert g["lr_scale"] == (0.1 if in_backbone.pop() else 1.0)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in objective.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"decoders": "sometimes"}, "objective.decoders"),
        ({"strides": [8, 64]}, "objective.strides"),
        ({"num_queries": 2}, "objective.num_queries"),
        ({"dim": 30}, "objective.dim"),
    ],
)
def test_bad_config_values_raise_config_error_naming_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _objective(**overrides)


# ----------------------------------------------------------------------------------------------------------- data


def test_static_pair_shift_moves_boxes_with_the_image() -> None:
    """A bright rectangle on black: after the random shift the new box still covers the bright pixels."""
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    image[10:30, 20:32] = 255
    ann = {"prev": np.array([[1, 20, 10, 12, 20]], float), "cur": np.zeros((0, 5)), "static": True}
    transform = TrackPairTransform((48, 64), [0, 0, 0], [1, 1, 1], max_objects=3, flip=False, shift=0.2, scale=0.2)
    for seed in range(5):
        torch.manual_seed(seed)
        out = transform((image, image), ann)
        assert out["cur_mask"].tolist() == [True, False, False] and out["cur_ids"][0] == 1
        cx, cy, w, _ = out["cur_boxes"][0].tolist()
        bright = out["cur"][0] > 0.5  # (H, W)
        ys, xs = torch.nonzero(bright, as_tuple=True)
        assert xs.float().mean().item() / 64 == pytest.approx(cx, abs=0.03)
        assert ys.float().mean().item() / 48 == pytest.approx(cy, abs=0.03)
        assert (xs.max() - xs.min() + 1).item() / 64 == pytest.approx(w, abs=0.05)
        assert torch.equal(out["prev_boxes"][0], torch.tensor([26 / 64, 20 / 48, 12 / 64, 20 / 48]))


def test_boxes_are_clipped_to_the_image_and_tiny_remainders_dropped() -> None:
    rows = np.array([[1, -10, 5, 20, 10], [2, 60, 0, 10, 10], [3, 5, 5, 10, 10]], float)  # id, l, t, w, h
    out = normalised_boxes(rows, width=64, height=32)
    assert out[:, 0].tolist() == [1, 2, 3]
    np.testing.assert_allclose(out[0, 1:], [5 / 64, 10 / 32, 10 / 64, 10 / 32])  # x clipped to [0, 10]
    assert len(normalised_boxes(np.array([[4, 63, 0, 10, 10]], float), 64, 32)) == 0  # 1 px left inside


# ---------------------------------------------------------------------------------- train, then `vitssl track run`


def _tiny_training(tmp_path: Path) -> Path:
    from vitssl.cli import main

    rc = main(["train", "video/transtrack_demo", f"output_dir={tmp_path / 'run'}",
               f"data.train.root={tmp_path / 'data'}",
               "data.train.kwargs.generate.num_sequences=1", "data.train.kwargs.generate.num_frames=6",
               "data.train.kwargs.generate.size=[48,64]", "objective.input_size=[32,48]", "train.batch_size=4",
               "train.epochs=1", "objective.enc_layers=1", "objective.dec_layers=1"])  # fmt: skip
    assert rc == 0
    return tmp_path / "run" / "checkpoint_last.pth"


def test_train_demo_recipe_then_track_run_writes_mot_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vitssl.cli import main
    from vitssl.video.track.mot import read_mot
    from vitssl.video.track.synth import write_sequences

    checkpoint = _tiny_training(tmp_path)
    assert checkpoint.is_file()
    (seq,) = write_sequences(tmp_path / "held", num_sequences=1, num_frames=5, size=(48, 64), seed=3)
    capsys.readouterr()
    for extra, name in (([], "tt.txt"), (["--baseline", "iou"], "iou.txt")):
        # a low threshold: the two-step model's scores sit near the focal prior, and rows must come out
        assert main(["track", "run", str(checkpoint), "--seq", str(seq), "--out", str(tmp_path / name),
                     "--score-thresh", "0.0", *extra]) == 0  # fmt: skip
        printed = capsys.readouterr().out
        assert "frames/s: backbone" in printed and "transformer" in printed and "association" in printed
        assert "MOTA" in printed  # the sequence has ground truth: metrics are printed
        rows = read_mot(tmp_path / name)
        assert len(rows) > 0 and set(np.unique(rows[:, 0])) <= set(range(1, 6))
        assert (rows[:, 7:] == -1).all() and ((rows[:, 6] >= 0) & (rows[:, 6] <= 1)).all()
        for f in np.unique(rows[:, 0]):  # ids are unique within a frame
            ids = rows[rows[:, 0] == f, 1]
            assert len(ids) == len(set(ids))

    # bad inputs: one line, exit status 2
    assert main(["track", "run", str(tmp_path / "nope.pth"), "--seq", str(seq), "--out", str(tmp_path / "x")]) == 2
    assert (
        main(["track", "run", str(checkpoint), "--seq", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    )
    assert main(["track", "run", str(checkpoint), "--seq", str(tmp_path / "held"), "--out", str(tmp_path / "x"),
                 "--render", str(tmp_path / "x.gif")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("vitssl track: error:") for line in err)


def test_pair_datasets_read_crowdhuman_and_refuse_bad_roots(tmp_path: Path) -> None:
    import json

    from PIL import Image

    from vitssl.data import build_dataset
    from vitssl.errors import DataError, MissingFileError

    (tmp_path / "Images").mkdir()
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "Images" / "a.jpg")
    boxes = [{"tag": "person", "fbox": [1, 2, 10, 20], "vbox": [1, 2, 5, 5]},
             {"tag": "mask", "fbox": [0, 0, 4, 4]},
             {"tag": "person", "fbox": [5, 5, 9, 9], "extra": {"ignore": 1}}]  # fmt: skip
    (tmp_path / "annotation_train.odgt").write_text(json.dumps({"ID": "a", "gtboxes": boxes}) + "\n")
    ds = build_dataset("crowdhuman", root=str(tmp_path), split="train")
    (prev, cur), ann = ds[0]
    assert prev.shape == (30, 40, 3) and cur is prev and ann["static"]
    assert ann["cur"].tolist() == [[1, 1, 2, 10, 20]]  # the person, not the mask nor the ignored one
    with pytest.raises(MissingFileError, match=r"annotation_val\.odgt"):
        build_dataset("crowdhuman", root=str(tmp_path), split="val")
    with pytest.raises(DataError, match=r"data\.train\.root"):
        build_dataset("mot_pairs", root=None)
    with pytest.raises(MissingFileError, match="does not exist"):
        build_dataset("mot_pairs", root=str(tmp_path / "missing"))


def test_track_demo_keeps_only_its_outputs_also_when_it_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vitssl.video.track.infer as infer
    from vitssl.demos import track as track_demo

    monkeypatch.chdir(tmp_path)  # the recipe's own paths are relative: nothing may land beside the demo folder
    monkeypatch.setattr(track_demo, "HELD_OUT", {"num_sequences": 1, "num_frames": 4, "size": (48, 64), "seed": 7})
    out = tmp_path / "demo"
    overrides = [f"output_dir={out}", "data.train.kwargs.generate.num_sequences=1",
                 "data.train.kwargs.generate.num_frames=6", "data.train.kwargs.generate.size=[48,64]",
                 "objective.input_size=[32,48]", "train.batch_size=4", "train.epochs=1", "objective.dec_layers=1",
                 "objective.score_thresh=0.0"]  # fmt: skip
    results = track_demo.run_track_demo(overrides)
    assert set(results) >= {"transtrack", "iou_baseline", "held_out"}
    kept = sorted(p.name for p in out.iterdir())
    assert kept == ["iou_baseline_SYN-01.mp4", "results", "results.json", "train", "transtrack_SYN-01.mp4"]
    assert sorted(p.name for p in (out / "results").iterdir()) == ["iou_baseline", "transtrack"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no training sequences elsewhere either
    assert not list(tmp_path.rglob("seqinfo.ini")) and not list(tmp_path.rglob("img1"))

    def broken(*args: object, **kwargs: object) -> None:
        assert (out / track_demo.SYNTHETIC / "heldout").is_dir()  # the sequences existed while the demo ran
        raise RuntimeError("tracking failed")

    monkeypatch.setattr(infer, "track_path", broken)
    with pytest.raises(RuntimeError, match="tracking failed"):
        track_demo.run_track_demo(overrides)  # reuses the trained run, then fails while tracking
    assert not (out / track_demo.SYNTHETIC).exists()
    assert not list(tmp_path.rglob("seqinfo.ini"))
