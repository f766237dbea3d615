"""Temporal Context Aggregation (TCA, Shao et al., WACV 2021): video embeddings for near-duplicate retrieval.

A frozen image backbone embeds frames sampled at 1 fps; the frame features are PCA-whitened (eigen power -0.5,
to 1024 dimensions in the published setting) and L2-normalised, and one transformer-encoder layer (8 heads,
FFN 2048, dropout 0.2, no position encoding, a key padding mask for variable lengths) mixes them over time.
The video vector is the masked mean of its outputs, L2-normalised; the frame outputs, L2-normalised, serve
chamfer similarity.

The ``video_tca`` objective trains the encoder contrastively on frame-feature sequences: two views of the same
video are positives; the other videos of the global batch and a MoCo-style queue of earlier keys (4096 in the
published setting, key momentum 0: keys come from the query encoder itself, without gradient) are negatives.
The loss is InfoNCE, or the official code's CircleLoss (m 0.25, gamma 256) on the same cosine logits.
``objective.wiring=official`` trains as the official code does instead (``neg_num`` drawn negatives per anchor
through the key encoder, logits against the positive and a queue of negatives only; :class:`VideoTCA`).
Keys are gathered across ranks like the MoCo v3 loss, so W ranks of N videos compute what one process computes
on the concatenated batch, and every rank enqueues the same keys.

Views. Frame features are extracted once per video (unaugmented frames at the configured rate, through the
frame-feature cache) and each training view is drawn from the cached sequence: a random temporal crop, a
frame-rate change (frames skipped or repeated), randomly dropped frames and a cap on the length. No spatial
augmentation happens at training time: it would need the backbone on every frame of every step. Invariance
to spatial edits comes from videos that share a group (a second column of the split list, e.g. a source and
its edited copies): with ``objective.group_positive_p`` the second view is drawn from another member of the
group, and members of a query's group are never counted as its negatives (in the batch or the queue).

The PCA lives in the objective as buffers (``pca_matrix``, ``pca_bias``), so a checkpoint holds the frame
backbone, the whitening and the encoder: :class:`TCAEmbedder` embeds raw frame features or video files from
the checkpoint alone.
"""

from vitssl.video.tca.data import FeatureViews, VideoFiles, ViewParams, draw_view
from vitssl.video.tca.evaluate import TCAEmbedder
from vitssl.video.tca.loss import LOSSES, official_circle_loss, tca_logits_loss, tca_loss, tca_official_loss
from vitssl.video.tca.model import (
    DEFAULT_CACHE,
    FRAMES_FILE,
    OFFSETS_FILE,
    PCA_FILE,
    WIRINGS,
    KeyQueue,
    TCAEncoder,
    VideoTCA,
    VideoTCAConfig,
    fit_pca,
    pca_affine,
)

__all__ = [
    "DEFAULT_CACHE",
    "FRAMES_FILE",
    "LOSSES",
    "OFFSETS_FILE",
    "PCA_FILE",
    "WIRINGS",
    "FeatureViews",
    "KeyQueue",
    "TCAEmbedder",
    "TCAEncoder",
    "VideoFiles",
    "VideoTCA",
    "VideoTCAConfig",
    "ViewParams",
    "draw_view",
    "fit_pca",
    "official_circle_loss",
    "pca_affine",
    "tca_logits_loss",
    "tca_loss",
    "tca_official_loss",
]
