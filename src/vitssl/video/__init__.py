"""Video: reading clips, frame samplers, video datasets and clip transforms, and heads on image backbones.

- ``io``: ``probe`` (frames that decode, damage, fps, upright size, codec) and ``read_frames`` (exact upright
  frames as uint8 ``(T, H, W, 3)`` through TorchCodec, PyAV or decord: ``io.readers`` is the one module that
  imports them; ``io.probing`` indexes files and finds damage, ``io.cache`` the per-process memos,
  ``io.report`` what ``vitssl video probe`` / ``readers`` print).
- ``samplers``: TSN segments, dense clips and multi-view test indices, as pure index arithmetic.
- ``datasets``: ``videofolder``, ``video_csv`` and the procedural ``motion`` set (label = direction of motion).
- ``transforms``: clip transforms with one spatial augmentation for every frame; batches are ``(B, T, C, H, W)``.
- ``heads`` (a registry of heads by name: mean, ViViT temporal, or your own), ``action`` (the ``video_action``
  objective), ``evaluate`` (multi-view tests), ``action_report`` (``vitssl video eval``: scores, figure, JSON).
- ``frame_cache`` (a frozen backbone's per-frame features, computed once; the ``frame_features`` dataset),
  ``position`` (``blob_position``: the action demo's image pretraining on ``motion_frames``).
- ``prepare``: re-encode a video collection for fast random access (``vitssl video prepare``).

Importing the package itself is light (importing ``vitssl.video.io`` runs this file first, and reading a video
must not import torch models or open_clip). :func:`register` imports the modules whose import registers the
video datasets and objectives; ``vitssl.cli`` calls it before reading a config, and so does ``import
vitssl.video.registered``.
"""


def register() -> None:
    """Register the video objectives (video_action, blob_position, video_tca, transtrack) and datasets."""
    from vitssl.video import action, datasets, frame_cache, position  # noqa: F401
    from vitssl.video.tca import VideoFiles, VideoTCA  # noqa: F401  (register video_tca; video_files)
    from vitssl.video.track import data, objective  # noqa: F401  (register transtrack; mot_pairs, crowdhuman)
