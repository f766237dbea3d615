"""Tiny synthetic videos whose pixels spell their frame index, for exact frame-reading tests.

Each frame is a grid of ``_COLS x _ROWS`` big black/white blocks, one bit of the frame index per block (bit 0 top
left, row-major), so lossy codecs and 4:2:0 chroma cannot flip a bit: ``decode_index`` averages each block's
interior and thresholds at mid-grey. 12 bits cover 4096 frames. Written with PyAV (yuv420p, a keyframe every
``gop`` frames) so that random access has to seek and decode forward.
"""

from __future__ import annotations

import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np

_COLS, _ROWS = 4, 3  # 12 bits
_CONTAINERS = {".mp4": "mp4", ".mkv": "matroska", ".avi": "avi"}
_CODECS = {"h264": "libx264", "mpeg4": "mpeg4"}


def index_frame(index: int, width: int, height: int) -> np.ndarray:
    """The uint8 ``(height, width, 3)`` frame that spells ``index`` in black/white blocks."""
    bits = [(index >> b) & 1 for b in range(_COLS * _ROWS)]
    grid = np.array(bits, dtype=np.uint8).reshape(_ROWS, _COLS) * 255  # (rows, cols)
    ys = np.arange(height) * _ROWS // height  # block row of each pixel row
    xs = np.arange(width) * _COLS // width
    frame = grid[ys[:, None], xs[None, :]]  # (H, W)
    return np.repeat(frame[:, :, None], 3, axis=2)  # (H, W, 3)


def decode_index(frame: np.ndarray) -> int:
    """Read back the index a frame of :func:`index_frame` spells (``frame``: uint8 ``(H, W, 3)`` or a tensor)."""
    frame = np.asarray(frame)
    height, width = frame.shape[:2]
    grey = frame.astype(np.float32).mean(axis=2)  # (H, W)
    index = 0
    for b in range(_COLS * _ROWS):
        row, col = divmod(b, _COLS)
        y0, y1 = row * height // _ROWS, (row + 1) * height // _ROWS
        x0, x1 = col * width // _COLS, (col + 1) * width // _COLS
        # the interior only: codecs smear block edges
        my, mx = max((y1 - y0) // 4, 0), max((x1 - x0) // 4, 0)
        if grey[y0 + my : y1 - my, x0 + mx : x1 - mx].mean() > 127.5:
            index |= 1 << b
    return index


def write_video(
    path: str | Path,
    num_frames: int = 40,
    width: int = 64,
    height: int = 48,
    fps: int = 25,
    codec: str = "h264",
    gop: int = 12,
    texture: bool = False,
    faststart: bool = False,
    rotation: int = 0,
    vfr: bool = False,
) -> Path:
    """Write a video whose frame ``i`` spells ``i``; the container follows the suffix (.mp4, .mkv, .avi).

    Args:
        path: output file.
        num_frames: frames to write.
        width, height: frame size (even: yuv420p).
        fps: frame rate.
        codec: "h264" (libx264) or "mpeg4".
        gop: keyframe interval; small, so that random access seeks to a keyframe and decodes forward.
        texture: add a grainy texture that pans 2 pixels a frame (+-40 grey levels, the bits still read): a
            bitrate closer to camera footage, for benchmarks.
        faststart: mp4 with its index (moov, the frame table) before the frames, as web videos are: a file cut
            short still opens, and its index lists frames that are gone.
        rotation: a display-matrix rotation (degrees counter-clockwise, a multiple of 90; phones write -90): the
            frames stored are the upright ones turned the other way, ``width x height`` is the stored size, and a
            reader that honours the matrix returns upright frames that spell their index.
        vfr: variable frame rate: frame durations cycle through 20, 40 and 60 ms (millisecond timestamps).
    """
    import av

    path = Path(path)
    muxer = {"movflags": "faststart"} if faststart else {}
    container = av.open(str(path), mode="w", format=_CONTAINERS[path.suffix.lower()], options=muxer)
    options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": "0"}
    if codec == "h264":
        options.update(preset="ultrafast", crf="18")
    stream = container.add_stream(_CODECS[codec], rate=Fraction(fps), options=options)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    if codec == "mpeg4":
        stream.bit_rate = 2_000_000  # high: keeps the blocks clean at tiny sizes
    # 2x2-pixel grains: camera-like detail that inter prediction can follow, not incompressible pixel noise
    grains = np.random.default_rng(0).integers(-40, 41, size=(height // 2 + 1, width // 2 + num_frames + 1, 1))
    noise = grains.repeat(2, axis=0).repeat(2, axis=1)[:height].astype(np.int16)  # (H, W + 2 * frames + 2, 1)
    turns = (rotation // 90) % 4
    if turns:
        stream.set_display_rotation(rotation)
    if vfr:
        stream.codec_context.time_base = Fraction(1, 1000)
    stamp = 0
    for i in range(num_frames):
        upright = (height, width) if turns % 2 == 0 else (width, height)  # (H, W) as displayed
        pixels = index_frame(i, upright[1], upright[0])
        # stored = upright turned back: the reader's rotation by `rotation` counter-clockwise undoes it
        pixels = np.ascontiguousarray(np.rot90(pixels, k=-turns))  # (height, width, 3)
        if texture:
            pixels = np.clip(pixels + noise[:, 2 * i : 2 * i + width], 0, 255).astype(np.uint8)  # (H, W, 3)
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        if vfr:
            frame.pts, frame.time_base = stamp, Fraction(1, 1000)
            stamp += (20, 40, 60)[i % 3]
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def truncated_copy(src: str | Path, dst: str | Path, fraction: float = 0.5) -> Path:
    """Copy the first ``fraction`` of ``src``'s bytes to ``dst``: a download cut in the middle."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def copy_video(src: str | Path, dst: str | Path) -> Path:
    """A plain copy (for tests that need a second file with the same frames)."""
    shutil.copyfile(src, dst)
    return Path(dst)


def damaged_copy(src: str | Path, dst: str | Path, fraction: float = 0.6) -> Path:
    """A web-style mp4 whose header lists every frame of ``src`` but whose data stops at ``fraction`` of the
    file: decoding fails part-way (the header of a 50-frame video, 26 frames that decode)."""
    return truncated_copy(src, dst, fraction)
