"""Video: reading clips, frame samplers, video datasets and clip transforms, and heads on image backbones.

- ``io``: ``probe`` (verified frame count, fps, size, codec) and ``read_frames`` (exact frames as uint8
  ``(T, H, W, 3)``; PyAV by default, decord on request: the one module that imports decord).
- ``samplers``: TSN segments, dense clips and multi-view test indices, as pure index arithmetic.
- ``datasets``: ``videofolder``, ``video_csv`` and the procedural ``motion`` set (label = direction of motion).
- ``transforms``: clip transforms with one spatial augmentation for every frame; batches are ``(B, T, C, H, W)``.
- ``heads`` (mean, ViViT temporal), ``action`` (the ``video_action`` objective), ``evaluate`` (multi-view tests).

Importing the package registers its datasets and objectives; ``vitssl.cli`` imports it before reading a
config.
"""

from vitssl.video import action, datasets  # noqa: F401  (register video_action; videofolder, video_csv, motion)
