"""TCA (``video_tca``): encoder and padding mask, the loss against a reference (1 and 2 processes), the key queue
and its exact resume, feature views, and a tiny training run through the engine."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from tests._dist import run_distributed
from vitssl.backbones import create_backbone
from vitssl.config import ConfigError
from vitssl.distributed import get_rank
from vitssl.video.tca import KeyQueue, TCAEncoder, VideoTCA, VideoTCAConfig, ViewParams, draw_view, tca_loss

_N, _W, _E, _K = 3, 2, 8, 5
_TAU, _M, _GAMMA = 0.1, 0.25, 16.0


# ------------------------------------------------------------------------------------------------ encoder
def test_encoder_shapes_and_norms() -> None:
    enc = TCAEncoder(12, dim=16, num_heads=4, ffn=32, dropout=0.2, layers=1).eval()
    frames, valid = torch.randn(2, 5, 12), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    video, out = enc(frames, valid)
    assert video.shape == (2, 16) and out.shape == (2, 5, 16)
    torch.testing.assert_close(video.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(out[valid].norm(dim=1), torch.ones(8))
    assert torch.count_nonzero(out[~valid]) == 0
    assert isinstance(enc.proj, torch.nn.Linear)
    assert isinstance(TCAEncoder(16, 16, 4, 32).proj, torch.nn.Identity)  # TCA: no projection


def test_published_encoder_layout() -> None:
    enc = TCAEncoder(1024)
    layers = enc.encoder.layers
    assert len(layers) == 1
    layer = layers[0]
    assert layer.self_attn.num_heads == 8 and layer.self_attn.embed_dim == 1024
    assert layer.linear1.out_features == 2048 and layer.dropout.p == 0.2
    assert not any("pos" in n for n, _ in enc.named_parameters())  # no position encoding


def test_padding_does_not_change_outputs() -> None:
    torch.manual_seed(0)
    enc = TCAEncoder(16, 16, 4, 32, dropout=0.2).eval()
    seqs = [torch.randn(n, 16) for n in (3, 7, 1)]
    alone = [enc(s[None], torch.ones(1, len(s), dtype=torch.bool)) for s in seqs]
    for pad_to in (7, 11):
        frames = torch.full((3, pad_to, 16), 1e3)  # garbage in the padding must not leak
        valid = torch.zeros(3, pad_to, dtype=torch.bool)
        for i, s in enumerate(seqs):
            frames[i, : len(s)], valid[i, : len(s)] = s, True
        video, out = enc(frames, valid)
        for i, (v, o) in enumerate(alone):
            torch.testing.assert_close(video[i], v[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out[i, : len(seqs[i])], o[0], atol=1e-5, rtol=1e-5)
    # no position encoding: the video vector does not depend on frame order
    s = seqs[1]
    torch.testing.assert_close(enc(s.flip(0)[None], torch.ones(1, 7, dtype=torch.bool))[0], alone[1][0], atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="at least one valid frame"):
        enc(frames, torch.zeros_like(valid))


# ---------------------------------------------------------------------------------------------------- loss
def _reference(q, k_all, queue, groups_all, queue_groups, rows, loss) -> torch.Tensor:
    """Row by row, as the formulas read: candidates = all keys then the queue; same-group negatives dropped."""
    q, k_all, queue = F.normalize(q, dim=1), F.normalize(k_all, dim=1), F.normalize(queue, dim=1)
    total = 0.0
    for qi, i in zip(q, rows, strict=True):
        cands = list(zip(k_all, groups_all.tolist(), strict=True)) + list(
            zip(queue, queue_groups.tolist(), strict=True)
        )
        pos = float(qi @ k_all[i])
        negs = [float(qi @ c) for j, (c, g) in enumerate(cands) if j != i and not (g >= 0 and g == groups_all[i])]
        if loss == "infonce":
            logits = [pos / _TAU] + [s / _TAU for s in negs]
        else:
            logits = [_GAMMA * max(0.0, 1 + _M - pos) * (pos - (1 - _M))]
            logits += [_GAMMA * max(0.0, s + _M) * (s - _M) for s in negs]
        total += -logits[0] + math.log(sum(math.exp(x) for x in logits))
    return torch.tensor(total / len(rows), dtype=torch.float64)


def _batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(_W * _N, _E, generator=g, dtype=torch.float64) for _ in range(2))
    queue = F.normalize(torch.randn(_K, _E, generator=g, dtype=torch.float64), dim=1)
    groups = torch.tensor([0, 1, 2, 1, 4, 5])  # rows 1 and 3 share a group (and sit on different ranks)
    queue_groups = torch.tensor([-1, 2, 7, 4, -1])  # queue entries of rows 2 and 4's groups
    return q, k, queue, groups, queue_groups


@pytest.mark.parametrize("loss", ["infonce", "circle"])
def test_loss_equals_reference_one_process(loss: str) -> None:
    q, k, queue, groups, queue_groups = _batch()
    got, keys, got_groups = tca_loss(q, k, queue, groups, queue_groups, loss=loss, temperature=_TAU, margin=_M,
                                     gamma=_GAMMA)  # fmt: skip
    want = _reference(q, k, queue, groups, queue_groups, range(_W * _N), loss)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(keys, F.normalize(k, dim=1))
    assert torch.equal(got_groups, groups)


def test_loss_gradient_flows_to_queries_only() -> None:
    q, k, queue, groups, queue_groups = _batch()
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    tca_loss(q, k, queue, groups, queue_groups)[0].backward()
    assert q.grad is not None and q.grad.abs().sum() > 0 and k.grad is None


def _two_rank_tca() -> dict:
    rank = get_rank()
    q, k, queue, groups, queue_groups = _batch()
    rows = slice(rank * _N, (rank + 1) * _N)
    out = {}
    for loss in ("infonce", "circle"):
        qr = q[rows].clone().requires_grad_()
        value, keys, all_groups = tca_loss(qr, k[rows], queue, groups[rows], queue_groups, loss=loss, temperature=_TAU,
                                           margin=_M, gamma=_GAMMA)  # fmt: skip
        (grad,) = torch.autograd.grad(value, qr)
        out[loss] = (value.detach(), grad, keys, all_groups)
    queue_mod = KeyQueue(_K, _E).double()
    queue_mod.push(out["infonce"][2], out["infonce"][3])
    out["queue"] = {k: v.clone() for k, v in queue_mod.state_dict().items()}
    return out


@pytest.fixture(scope="module")
def two_rank_results() -> list[dict]:
    return run_distributed(_two_rank_tca, _W)


@pytest.mark.parametrize("loss", ["infonce", "circle"])
def test_two_ranks_equal_the_concatenated_batch(two_rank_results: list[dict], loss: str) -> None:
    q, k, queue, groups, queue_groups = _batch()
    q = q.clone().requires_grad_()
    single, keys, all_groups = tca_loss(q, k, queue, groups, queue_groups, loss=loss, temperature=_TAU, margin=_M,
                                        gamma=_GAMMA)  # fmt: skip
    (single_grad,) = torch.autograd.grad(single, q)
    values, grads, rank_keys, rank_groups = zip(*(r[loss] for r in two_rank_results))
    torch.testing.assert_close(torch.stack(values).mean(), single.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.cat(grads) / _W, single_grad, rtol=1e-9, atol=1e-12)  # DDP's average
    for got_keys, got_groups in zip(rank_keys, rank_groups, strict=True):  # every rank enqueues the same keys
        torch.testing.assert_close(got_keys, keys)
        assert torch.equal(got_groups, all_groups)


def test_two_rank_queues_agree(two_rank_results: list[dict]) -> None:
    a, b = (r["queue"] for r in two_rank_results)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_queue_is_a_fifo_of_buffers() -> None:
    queue = KeyQueue(4, 2)
    assert {"keys", "groups", "ptr"} <= set(queue.state_dict())
    keys = torch.arange(12.0).view(6, 2)
    queue.push(keys[:3], torch.tensor([0, 1, 2]))
    assert int(queue.ptr) == 3 and queue.groups.tolist() == [0, 1, 2, -1]
    queue.push(keys[3:], torch.tensor([3, 4, 5]))  # wraps around
    assert int(queue.ptr) == 2 and queue.groups.tolist() == [4, 5, 2, 3]
    assert torch.equal(queue.keys[0], keys[4])
    queue.push(torch.zeros(9, 2), torch.arange(9))  # more than K: the last K stay
    assert sorted(queue.groups.tolist()) == [5, 6, 7, 8]


# --------------------------------------------------------------------------------------------------- views
def test_views_crop_resample_drop_and_cap() -> None:
    rng = np.random.RandomState(0)
    p = ViewParams(crop=(0.5, 1.0), speed=(0.5, 2.0), drop_p=0.2, max_frames=12)
    lengths = []
    for _ in range(200):
        idx = draw_view(20, p, rng)
        assert 1 <= len(idx) <= 12 and idx.min() >= 0 and idx.max() < 20
        assert np.all(np.diff(idx) >= 0)  # time order kept
        lengths.append(len(idx))
    assert len(set(lengths)) > 5
    assert draw_view(1, p, rng).tolist() == [0]


# ---------------------------------------------------------------------------------------------- objective
def _objective(**overrides: object) -> VideoTCA:
    cfg = OmegaConf.structured(VideoTCAConfig(**{"pca_dim": 16, "num_heads": 4, "ffn": 32, "queue_size": 8,
                                                 **overrides}))  # fmt: skip
    torch.manual_seed(0)
    obj = VideoTCA(cfg, lambda: create_backbone("test_vit", img_size=16))
    d = obj.backbone.num_features
    obj.set_pca(torch.eye(d)[:, :16], torch.zeros(16))
    return obj


def _feature_batch(b: int = 4, t: int = 6, d: int = 32) -> tuple:
    g = torch.Generator().manual_seed(1)
    valid = torch.arange(t)[None].expand(b, t) < torch.randint(1, t + 1, (b, 1), generator=g)
    views = [(torch.randn(b, t, d, generator=g), valid) for _ in range(2)]
    return views[0], views[1], torch.arange(b)


def test_objective_forward_backward_and_queue() -> None:
    obj = _objective().train()
    out = obj(_feature_batch())
    assert out["loss"].ndim == 0 and math.isfinite(out["loss"].item())
    out["loss"].backward()
    missing = [n for n, p in obj.encoder.named_parameters() if p.grad is None]
    assert not missing
    assert all(p.grad is None for p in obj.backbone.parameters())
    assert int(obj.queue.ptr) == 4 and obj.queue.groups.tolist()[:4] == [0, 1, 2, 3]
    assert {id(p) for g in obj.param_groups(0.1) for p in g["params"]} == {id(p) for p in obj.encoder.parameters()}
    assert {"pca_matrix", "pca_bias", "queue.keys", "queue.ptr"} <= set(obj.state_dict())


@pytest.mark.parametrize(
    ("overrides", "key"),
    [({"loss": "triplet"}, "objective.loss"), ({"pca_dim": 64}, "objective.pca_dim"),
     ({"num_heads": 3}, "objective.num_heads"), ({"crop": [0.0, 1.0]}, "objective.crop"),
     ({"key_momentum": 1.0}, "objective.key_momentum")],
)  # fmt: skip
def test_bad_config_values_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _objective(**overrides)


# ------------------------------------------------------------------------------------ through the engine
def _corpus(root: Path) -> Path:
    from tests._videos import write_video

    root.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        write_video(root / f"v{i}.mp4", num_frames=20 + 5 * i, width=16, height=16, fps=10, gop=5)
    (root / "train.txt").write_text("v0.mp4 a\nv1.mp4 a\nv2.mp4 b\nv3.mp4 c\n# comment\nv4.mp4 d\nv5.mp4 e\n")
    return root


_TINY = [
    "model.backbone=test_vit",
    "~model.backbone_kwargs",
    "objective.frame_backbone=null",
    "objective.fps=5",
    "objective.pca_dim=8",
    "objective.num_heads=2",
    "objective.ffn=16",
    "objective.queue_size=6",
    "objective.max_frames=8",
    "objective.group_positive_p=0.5",
    "~data.train.kwargs.ground_truth",
    "data.img_size=16",
    "train.epochs=2",
    "train.batch_size=2",
    "train.checkpoint_every_steps=2",
    "train.log_every_steps=1",
]


def _cfg(out: Path, corpus: Path, *extra: str):
    from vitssl.config import load_config

    return load_config("video/tca_demo", [f"output_dir={out}", f"data.train.root={corpus}", *_TINY, *extra])


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_train_stop_resume_equals_uninterrupted_and_embedder(tmp_path: Path) -> None:
    from vitssl.cli import main as cli_main
    from vitssl.engine import load_checkpoint, train
    from vitssl.engine.checkpoint import LAST_NAME
    from vitssl.video.tca import TCAEmbedder

    corpus = _corpus(tmp_path / "videos")
    full, part = tmp_path / "full", tmp_path / "part"
    cache = [f"objective.feature_cache={tmp_path / 'cache'}"]  # frames extracted once for the three runs
    result = train(_cfg(full, corpus, *cache))
    assert result.status == "finished" and result.step == 6  # 6 videos / 2 per step x 2 epochs
    assert {"tca_pca.npz", "tca_train_frames.npy", "tca_train_offsets.npy", "tca_pca.faiss"} <= {
        p.name for p in full.iterdir()
    }
    # `vitssl train video/tca_demo`, stopped mid-epoch as a preemption would (in this process: same threads), resumed
    argv = ["train", "video/tca_demo", f"output_dir={part}", f"data.train.root={corpus}", *_TINY, *cache]
    assert cli_main([*argv, "train.stop_after_steps=2"]) == 0
    assert load_checkpoint(part / LAST_NAME)["step"] == 2
    resumed = train(_cfg(part, corpus, *cache))
    assert resumed.status == "finished" and resumed.step == 6
    assert _losses(part) == _losses(full)
    a, b = load_checkpoint(full / LAST_NAME)["model"], load_checkpoint(part / LAST_NAME)["model"]
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
    assert int(a["queue.ptr"]) == (6 * 2) % 6 and (a["queue.groups"] >= 0).all()  # 12 keys through a queue of 6

    embedder = TCAEmbedder.from_checkpoint(full / LAST_NAME)
    paths = [str(corpus / f"v{i}.mp4") for i in (0, 3)]
    raw = embedder.frame_features(paths)
    assert [len(r) for r in raw] == [10, 18]  # 2 s and 3.5 s at 5 fps
    vectors, outs = embedder.embed(raw)
    assert vectors.shape == (2, 8) and vectors.dtype == np.float32 and [o.shape for o in outs] == [(10, 8), (18, 8)]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    alone, _ = embedder.embed(raw[1:])
    np.testing.assert_allclose(alone[0], vectors[1], atol=1e-5)  # batching with a shorter video changes nothing
    again, _ = embedder.embed_videos(paths)
    np.testing.assert_allclose(again, vectors, atol=1e-6)
    with pytest.raises(ConfigError, match="video_tca"):
        TCAEmbedder.from_checkpoint(_other_checkpoint(tmp_path))


def _other_checkpoint(tmp_path: Path) -> Path:
    from vitssl.engine import save_checkpoint

    state = {"model": {}, "optimizer": {}, "step": 0, "epoch": 0, "config": {"objective": {"name": "supervised"}}}
    return save_checkpoint(state, tmp_path / "other")


def test_video_files_lists_groups_and_refuses_bad_input(tmp_path: Path) -> None:
    from vitssl.data import build_dataset
    from vitssl.errors import DataError, MissingFileError

    root = tmp_path / "v"
    (root / "sub").mkdir(parents=True)
    for name in ("a.mp4", "sub/b.mkv", "c.mp4"):
        (root / name).write_bytes(b"")
    (root / "notes.txt").write_text("not a video")
    ds = build_dataset("video_files", root=root, split="train")  # no list: every video, its own group
    assert [Path(p).name for p in ds.samples] == ["a.mp4", "c.mp4", "b.mkv"] and len(set(ds.targets)) == 3
    (root / "gt.jsonl").write_text(json.dumps({"query": "a.mp4", "relevant": ["sub/b.mkv"]}) + "\n")
    grouped = build_dataset("video_files", root=root, ground_truth=str(root / "gt.jsonl"))
    assert grouped.targets[0] == grouped.targets[2] != grouped.targets[1]
    assert grouped[0] == (str(root / "a.mp4"), grouped.targets[0])
    (root / "train.txt").write_text("a.mp4 x y\n")
    with pytest.raises(DataError, match=r"train\.txt:1"):
        build_dataset("video_files", root=root)
    with pytest.raises(MissingFileError, match="not a folder"):
        build_dataset("video_files", root=tmp_path / "nope")


def test_pca_buffers_reproduce_the_faiss_whitening(tmp_path: Path) -> None:
    from vitssl.video.frames import PCAWhitening
    from vitssl.video.tca import fit_pca

    rng = np.random.default_rng(0)
    frames = (rng.normal(size=(500, 12)) * np.linspace(0.2, 5.0, 12) + 3.0).astype(np.float32)  # (N, D)
    matrix, bias = fit_pca(frames, 6, max_frames=400, save_to=tmp_path / "pca.faiss")
    pca = PCAWhitening.load(tmp_path / "pca.faiss")
    np.testing.assert_allclose(frames @ matrix + bias, pca.apply(frames), rtol=1e-4, atol=1e-4)
    white = frames @ matrix + bias  # eigen power -0.5: equal variances
    # faiss scales every whitened component to variance 1 / (training frames); the objective L2-normalises after it
    np.testing.assert_allclose(np.cov(white.T) * 400, np.eye(6), atol=0.05)
    obj = _objective()
    x = torch.randn(3, 32)
    torch.testing.assert_close(obj.whiten(x), F.normalize(x[:, :16], dim=1))  # identity PCA: normalised input
    with pytest.raises(ConfigError, match="pca_dim"):
        obj.set_pca(matrix, bias)  # (12, 6) does not fit the objective's (32, 16)


def test_setup_refuses_decoded_clips_and_a_missing_frame_backbone(tmp_path: Path) -> None:
    from vitssl.engine import build_objective

    cfg = _cfg(
        tmp_path / "run",
        tmp_path,
        "data.train.name=motion",
        "data.train.root=null",
        "data.train.kwargs={num_samples: 4}",
    )
    with pytest.raises(ConfigError, match=r"data\.train\.name='motion'.*video_files"):
        build_objective(cfg).setup(cfg)
    cfg = _cfg(tmp_path / "run", tmp_path, f"objective.frame_backbone={tmp_path / 'nope.safetensors'}")
    with pytest.raises(ConfigError, match=r"objective\.frame_backbone=.*nope\.safetensors.*no such file"):
        build_objective(cfg).setup(cfg)


@pytest.mark.parametrize("recipe", ["video/tca_demo", "video/tca_vcdb", "video/tca_fivr_selfsup"])
def test_recipes_resolve_with_the_published_design(recipe: str) -> None:
    from vitssl.config import load_config

    o = load_config(recipe).objective
    assert (o.name, o.layers, o.dropout, o.key_momentum) == ("video_tca", 1, 0.2, 0.0)
    if recipe != "video/tca_demo":  # TCA's settings; the demo is the same design at a small width
        assert (o.fps, o.pca_dim, o.num_heads, o.ffn, o.queue_size, o.max_frames) == (1.0, 1024, 8, 2048, 4096, 300)
    if recipe == "video/tca_vcdb":
        assert (o.loss, o.circle_margin, o.circle_gamma, o.group_positive_p) == ("circle", 0.25, 256.0, 1.0)


def test_feature_views_pad_pick_group_partners_and_flag_unreadable_videos(tmp_path: Path) -> None:
    from vitssl.video.io import CorruptVideoError
    from vitssl.video.tca import FeatureViews

    lengths = [5, 0, 3, 4]  # video 1 could not be read: it owns no rows
    rows = np.concatenate([np.full((n, 2), v, np.float32) for v, n in enumerate(lengths)])  # row value = video
    np.save(tmp_path / "frames.npy", rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    views = FeatureViews(tmp_path / "frames.npy", offsets, ["a", "b", "c", "d"], [0, 0, 0, 1],
                         ViewParams(max_frames=6), group_positive_p=1.0)  # fmt: skip
    np.random.seed(0)
    partners = set()
    for _ in range(20):
        (f1, v1), (f2, v2), group = views("a", 0)
        assert f1.shape == (6, 2) and v1.dtype == torch.bool and v1[0] and group == 0
        assert torch.all(f1[v1] == 0) and torch.count_nonzero(f1[~v1]) == 0  # padding is zeros
        partners |= set(f2[v2][:, 0].tolist())
    assert partners == {2.0}  # always the readable other member of the group, never the unreadable video 1
    (_, _), (f2, v2), _ = views("d", 1)  # alone in its group: both views from itself
    assert set(f2[v2][:, 0].tolist()) == {3.0}
    with pytest.raises(CorruptVideoError, match="b"):
        views("b", 0)
    assert pickle.loads(pickle.dumps(views))._frames is None  # workers map the file themselves


# ------------------------------------------------------------------ the official wiring against its reference
# Transcriptions of the official code (xwen99/temporal_context_aggregation): model.py ``TCA`` (forward) and
# ``MoCo`` (forward, _momentum_update_key_encoder, _dequeue_and_enqueue; ``concat_all_gather`` of one process is
# the identity, ``.cuda()`` dropped) and utils.py ``CircleLoss``. ``TCA`` hard-codes dim_feedforward=2048; it is a
# parameter here so that the test runs at a tiny width.
class _RefTCA(torch.nn.Module):
    def __init__(self, feature_size=1024, max_seq_len=128, nhead=8, nlayers=1, dropout=0.1, dim_feedforward=2048):
        super().__init__()
        self.feature_size = feature_size
        encoder_layers = torch.nn.TransformerEncoderLayer(
            d_model=feature_size, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout
        )
        self.transformer_encoder = torch.nn.TransformerEncoder(encoder_layers, nlayers)

    def forward(self, x, num_frames):
        x = x.permute(2, 0, 1)  # (T, N, C)
        T, _, C = x.shape[:3]
        if len(num_frames.shape) == 1:
            num_frames = num_frames.unsqueeze(1)
        frame_mask = (num_frames - torch.arange(0, T) > 0).float()  # (N, T)
        assert self.feature_size == C
        output = self.transformer_encoder(x, src_key_padding_mask=(1 - frame_mask).bool())  # (T, N, C)
        output = output.permute(1, 0, 2)  # (N, T, C)
        output = output * frame_mask.unsqueeze(-1)
        frame_count = torch.sum(frame_mask, dim=-1, keepdim=True)  # (N, 1)
        output = torch.sum(output, dim=-2) / frame_count  # (N, C)
        return F.normalize(output, p=2, dim=1)


class _RefMoCo(torch.nn.Module):
    def __init__(self, base_encoder, dim=1024, K=65536, m=0.999, T=0.07):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q = base_encoder
        self.encoder_k = __import__("copy").deepcopy(self.encoder_q)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", torch.randn(dim, K))
        self.queue = F.normalize(self.queue, dim=0)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0
        self.queue[:, ptr : ptr + batch_size] = keys.T
        ptr = (ptr + batch_size) % self.K
        self.queue_ptr[0] = ptr

    def forward(self, a, p, n, len_a, len_p, len_n):
        if len(n.size()) > 3:
            n = n.view(-1, n.size()[2], n.size()[3])
            len_n = len_n.view(-1, 1)
        q = self.encoder_q(a, len_a)
        q = F.normalize(q, dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            p = self.encoder_k(p, len_p)
            p = F.normalize(p, dim=1)
            k = self.encoder_k(n, len_n)
            k = F.normalize(k, dim=1)
        l_pos = torch.einsum("nc,nc->n", [q, p]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1)
        logits /= self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        self._dequeue_and_enqueue(k)
        return logits, labels


class _RefCircleLoss(torch.nn.Module):
    def __init__(self, m=0.25, gamma=256, intended=False):
        super().__init__()
        self.m, self.gamma, self.intended = m, gamma, intended
        self.loss = torch.nn.CrossEntropyLoss()

    def forward(self, logits, labels):
        # intended=True: the positive is column 0 of every row (``[:, 0]``) where the official code wrote
        # ``[labels]``, which indexes rows
        rows = (slice(None), 0) if self.intended else labels
        alpha = torch.clamp_min(logits + self.m, min=0).detach()
        alpha[rows] = torch.clamp_min(-logits[rows] + 1 + self.m, min=0).detach()
        delta = torch.ones_like(logits, device=logits.device, dtype=logits.dtype) * self.m
        delta[rows] = 1 - self.m
        return self.loss(alpha * (logits - delta) * self.gamma, labels)


def _official_batch(seed: int, b: int = 4, m: int = 2, t: int = 6, d: int = 32) -> tuple:
    g = torch.Generator().manual_seed(seed)

    def views(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.randint(1, t + 1, (count,), generator=g)
        valid = torch.arange(t)[None] < lengths[:, None]  # (count, t)
        return torch.randn(count, t, d, generator=g, dtype=torch.float64) * valid[..., None], valid

    (fa, va), (fp, vp), (fn, vn) = views(b), views(b), views(b * m)
    return (fa, va), (fp, vp), (fn.view(b, m, t, d), vn.view(b, m, t)), torch.arange(b)


def _reference_inputs(batch: tuple, pca_dim: int) -> tuple:
    """The official dataset's tensors: PCA-whitened, L2-normalised features (here the whitening keeps the first
    ``pca_dim`` coordinates, as _objective sets it), ``(N, C, T)`` zero-padded, lengths as float tensors."""
    (fa, va), (fp, vp), (fn, vn), _ = batch
    white = lambda f: F.normalize(f[..., :pca_dim], dim=-1).transpose(-1, -2)
    length = lambda v: v.sum(-1, keepdim=v.ndim == 2).double()
    return white(fa), white(fp), white(fn), length(va), length(vp), length(vn)


@pytest.mark.parametrize("loss", ["circle_official", "circle", "infonce"])
def test_official_wiring_equals_the_reference_forward_loss_and_queue(loss: str) -> None:
    import warnings

    temperature = 0.5 if loss == "infonce" else 1.0
    overrides = {"wiring": "official", "neg_num": 2, "queue_size": 16, "dropout": 0.0, "loss": loss}
    obj = _objective(**overrides, temperature=temperature, circle_gamma=256.0).double().train()
    with warnings.catch_warnings():  # nested-tensor notice of the reference's seq-first layer
        warnings.simplefilter("ignore")
        encoder = _RefTCA(16, nhead=4, nlayers=1, dropout=0.0, dim_feedforward=32)
    encoder.transformer_encoder.load_state_dict(obj.encoder.encoder.state_dict())
    ref = _RefMoCo(encoder, dim=16, K=16, m=0.0, T=temperature).double().train()
    with torch.no_grad():
        ref.queue.copy_(obj.queue.keys.T)  # the same random start
    if loss == "infonce":
        criterion = torch.nn.CrossEntropyLoss()  # train.py's commented-out criterion
    else:
        criterion = _RefCircleLoss(m=0.25, gamma=256, intended=loss == "circle")
    ours_opt = torch.optim.Adam(obj.encoder.parameters(), lr=1e-2, weight_decay=1e-4)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, weight_decay=1e-4)
    for step in range(3):  # 8 negatives a step through a queue of 16: the third step wraps
        batch = _official_batch(step)
        got = obj(batch)["loss"]
        logits, labels = ref(*_reference_inputs(batch, 16))
        want = criterion(logits, labels)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(obj.queue.keys, ref.queue.T, atol=1e-6, rtol=0)  # only the negatives, in order
        assert int(obj.queue.ptr) == int(ref.queue_ptr) == (8 * (step + 1)) % 16
        assert (obj.queue.groups == -1).all()
        for opt, value in ((ours_opt, got), (ref_opt, want)):
            opt.zero_grad()
            value.backward()
            opt.step()
    reference = dict(ref.encoder_q.transformer_encoder.named_parameters())
    for name, param in obj.encoder.encoder.named_parameters():  # three Adam steps from the same loss gradients
        # (Adam divides by sqrt(v): a gradient at rounding level, e.g. of a bias the softmax cancels, moves by lr)
        torch.testing.assert_close(param, reference[name], atol=1e-5, rtol=0)


def test_official_circle_loss_treats_row_zero_as_the_positive_row() -> None:
    from vitssl.video.tca import official_circle_loss, tca_logits_loss

    logits = torch.tensor([[0.9, 0.1, -0.2], [0.8, 0.3, 0.0]], requires_grad=True)
    got = official_circle_loss(logits, margin=0.25, gamma=4.0)
    torch.testing.assert_close(got, _RefCircleLoss(0.25, 4.0)(logits, torch.zeros(2, dtype=torch.long)))
    intended = tca_logits_loss(logits, torch.zeros(2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool),
                               "circle", margin=0.25, gamma=4.0)  # fmt: skip
    assert not torch.allclose(got, intended)  # row 1's positive is scored as a negative there
    got.backward()
    assert torch.isfinite(logits.grad).all()


def test_feature_views_draw_distinct_negatives_outside_the_group(tmp_path: Path) -> None:
    from vitssl.errors import DataError
    from vitssl.video.tca import FeatureViews

    lengths = [4, 3, 0, 5, 2, 6, 3]  # video 2 unreadable; groups: {0, 1}, {2}, {3}, {4}, {5}, {6}
    rows = np.concatenate([np.full((n, 2), v, np.float32) for v, n in enumerate(lengths)])  # row value = video
    np.save(tmp_path / "frames.npy", rows)
    offsets, paths, groups = (
        np.concatenate([[0], np.cumsum(lengths)]),
        [f"v{i}" for i in range(7)],
        [0, 0, 1, 2, 3, 4, 5],
    )
    views = FeatureViews(tmp_path / "frames.npy", offsets, paths, groups, ViewParams(max_frames=6), 1.0, neg_num=3)
    np.random.seed(0)
    seen = set()
    for _ in range(30):
        (fa, va), (fp, vp), (fn, vn), group = views("v0", 0)
        assert fn.shape == (3, 6, 2) and vn.shape == (3, 6) and group == 0
        assert set(fa[va][:, 0].tolist()) == {0.0} and set(fp[vp][:, 0].tolist()) == {1.0}  # the group partner
        negatives = [set(fn[j][vn[j]][:, 0].tolist()) for j in range(3)]
        assert all(len(s) == 1 for s in negatives)
        drawn = [s.pop() for s in negatives]
        assert len(set(drawn)) == 3 and set(drawn) <= {3.0, 4.0, 5.0, 6.0}  # distinct, outside the group, readable
        seen |= set(drawn)
    assert seen == {3.0, 4.0, 5.0, 6.0}
    with pytest.raises(DataError, match=r"objective\.neg_num=5.*only 4 readable"):
        FeatureViews(tmp_path / "frames.npy", offsets, paths, groups, ViewParams(max_frames=6), 1.0, neg_num=5)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"wiring": "moco"}, r"objective\.wiring='moco'; choose one of views, official"),
     ({"loss": "circle_official"}, r"objective\.loss=circle_official needs objective\.wiring=official"),
     ({"wiring": "official", "neg_num": 0}, r"objective\.neg_num=0 must be >= 1")],
)  # fmt: skip
def test_official_wiring_settings_are_checked(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _objective(**overrides)


def test_official_recipe_has_the_published_command_and_vcdb_keeps_vitssls_wiring() -> None:
    from vitssl.config import load_config
    from vitssl.engine.optim import build_optimizer

    assert load_config("video/tca_vcdb").objective.wiring == "views"
    cfg = load_config("video/tca_vcdb_official")
    o = cfg.objective
    assert (o.wiring, o.loss, o.queue_size, o.key_momentum, o.temperature, o.neg_num) == (
        "official", "circle_official", 4096, 0.0, 1.0, 16
    )  # fmt: skip
    assert (o.circle_margin, o.circle_gamma, o.pca_dim, o.max_frames, o.group_positive_p) == (
        0.25,
        256.0,
        1024,
        300,
        1.0,
    )
    assert (cfg.train.batch_size, cfg.train.epochs) == (64 * 8, 40)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.weight_decay_filter) == (
        "adam", 1e-5, 1e-4, False
    )  # fmt: skip
    optimizer = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}], cfg.optim)
    assert type(optimizer) is torch.optim.Adam  # L2 decay in the gradient, as torch.optim.Adam(weight_decay=...)


def test_official_wiring_trains_through_the_engine(tmp_path: Path) -> None:
    from vitssl.engine import load_checkpoint, train
    from vitssl.engine.checkpoint import LAST_NAME

    corpus = _corpus(tmp_path / "videos")
    official = ["objective.wiring=official", "objective.neg_num=2", "objective.loss=circle_official",
                "objective.temperature=1.0", "train.epochs=1", "optim.name=adam",
                "optim.weight_decay_filter=false"]  # fmt: skip
    result = train(_cfg(tmp_path / "run", corpus, *official))
    assert result.status == "finished" and result.step == 3  # 6 anchors, 2 per step
    state = load_checkpoint(tmp_path / "run" / LAST_NAME)["model"]
    assert int(state["queue.ptr"]) == (3 * 2 * 2) % 6 and (state["queue.groups"] == -1).all()  # negatives only
    assert all(math.isfinite(v) for v in _losses(tmp_path / "run").values())
