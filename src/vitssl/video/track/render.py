"""Tracks drawn on a sequence's frames: a box and its id per object, one colour per id, written as mp4 (PyAV)."""

from __future__ import annotations

import colorsys
from fractions import Fraction
from pathlib import Path

import numpy as np

from vitssl.io import PathLike, atomic_path
from vitssl.video.track.mot import Sequence, as_mot_rows

_GOLDEN = 0.618033988749895


def id_colour(track_id: int) -> tuple[int, int, int]:
    """A bright RGB colour for ``track_id``: hues spread by the golden ratio, so nearby ids differ."""
    r, g, b = colorsys.hsv_to_rgb((track_id * _GOLDEN) % 1.0, 0.85, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


def draw_tracks(image: np.ndarray, rows: np.ndarray, *, line: int = 2) -> np.ndarray:
    """``image`` (uint8 ``(H, W, 3)``) with the MOT ``rows`` of its frame drawn: boxes and ids in their colours."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(canvas)
    for row in as_mot_rows(rows):
        track_id = int(row[1])
        left, top, width, height = row[2:6]
        colour = id_colour(track_id)
        draw.rectangle([left, top, left + width - 1, top + height - 1], outline=colour, width=line)
        label = str(track_id)
        text_box = draw.textbbox((0, 0), label)
        tw, th = text_box[2] - text_box[0], text_box[3] - text_box[1]
        y = top - th - 3 if top - th - 3 >= 0 else top + line
        draw.rectangle([left, y, left + tw + 3, y + th + 3], fill=colour)
        draw.text((left + 2 - text_box[0], y + 1 - text_box[1]), label, fill=(0, 0, 0))
    return np.asarray(canvas)


def render_tracks(
    sequence: Sequence, results_rows: np.ndarray, out_path: PathLike, *, fps: float | None = None, crf: int = 20
) -> Path:
    """Write ``sequence``'s frames with ``results_rows`` drawn on them as an h264 mp4 (replaced atomically).

    Args:
        sequence: the sequence whose frames to draw on.
        results_rows: MOT rows ``(N, 6..10)`` (``frame,id,left,top,width,height,...``, 1-based frames).
        out_path: the video to write (.mp4).
        fps: frame rate; default the sequence's.
        crf: x264 quality (lower is better).

    Returns:
        ``out_path`` as a Path.
    """
    import av

    rows = as_mot_rows(results_rows)  # (N, 10)
    by_frame = {int(f): rows[rows[:, 0] == f] for f in np.unique(rows[:, 0])}
    # yuv420p needs even sizes: pad the bottom and right edge by one pixel where odd
    height, width = sequence.height + sequence.height % 2, sequence.width + sequence.width % 2
    out_path = Path(out_path)
    rate = Fraction(fps or sequence.fps or 25).limit_denominator(1000)
    with atomic_path(out_path) as tmp:
        container = av.open(str(tmp), mode="w", format="mp4")
        try:
            stream = container.add_stream("libx264", rate=rate, options={"crf": str(crf), "preset": "veryfast"})
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for i, image in sequence.frames():
                drawn = draw_tracks(image, by_frame.get(i, np.zeros((0, 10))))
                if drawn.shape[:2] != (height, width):
                    padded = np.zeros((height, width, 3), dtype=np.uint8)
                    padded[: drawn.shape[0], : drawn.shape[1]] = drawn
                    drawn = padded
                for packet in stream.encode(av.VideoFrame.from_ndarray(drawn, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        finally:
            container.close()
    return out_path
