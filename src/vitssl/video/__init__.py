"""Video: reading clips, frame samplers, video datasets and clip transforms, and heads on image backbones.

- ``io``: ``probe`` (verified frame count, fps, size, codec) and ``read_frames`` (exact frames as uint8
  ``(T, H, W, 3)``; PyAV by default, decord on request: the one module that imports decord).
- ``samplers``: TSN segments, dense clips and multi-view test indices, as pure index arithmetic.
- ``datasets``: ``videofolder``, ``video_csv`` and the procedural ``motion`` set (label = direction of motion).
- ``transforms``: clip transforms with one spatial augmentation for every frame; batches are ``(B, T, C, H, W)``.
- ``heads`` (mean, ViViT temporal), ``action`` (the ``video_action`` objective), ``evaluate`` (multi-view tests).
- ``frame_cache`` (a frozen backbone's per-frame features, computed once; the ``frame_features`` dataset),
  ``position`` (``blob_position``: the action demo's image pretraining on ``motion_frames``).

Importing the package registers its datasets and objectives; ``vitssl.cli`` imports it before reading a
config.
"""

# register video_action, blob_position; videofolder, video_csv, motion, motion_frames, frame_features
from vitssl.video import action, datasets, frame_cache, position  # noqa: F401
from vitssl.video.tca import VideoFiles, VideoTCA  # noqa: F401  (register video_tca; video_files)
from vitssl.video.track import data, objective  # noqa: F401  (register transtrack; mot_pairs, crowdhuman)
