"""Clips per second reading 8-frame TSN clips with random access: decord vs PyAV (vitssl.video.io).

Generates ``--files`` h264 mp4 files (``--frames`` frames of ``--size``, a keyframe every ``--gop`` frames, x264
ultrafast / crf 18, no B-frames) for each of two contents: "flat" (the index blocks alone: cheap to decode, so
per-frame overheads dominate) and "textured" (a panning grainy texture, about 1.2 Mbit/s: decoding dominates).
Each decoder then reads the same clips, file order shuffled: TSN test clips (segment centres) and TSN train
clips (seeded random offsets). One decoding thread everywhere (as in a DataLoader worker): decord
``num_threads=1``; PyAV ``thread_type="AUTO"``, ``thread_count=1``. PyAV runs in two configurations and the
faster is the baseline: ``seek`` (jump to the keyframe before each wanted frame whose GOP lies ahead, decode
forward) and ``sequential`` (decode from frame 0 to the last wanted frame). Every returned frame is checked
against the index its pixels spell.

The per-file frame index (packet timestamps, the verified frame count) is built once per file before timing,
as a DataLoader worker does on its first visit; its cost is reported separately.

Run: ``python benchmarks/video_reading.py [--files 16] [--frames 300] [--rounds 2]``; writes
``benchmarks/results/video_reading.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _videos import decode_index, write_video

RESULT = Path(__file__).resolve().parent / "results" / "video_reading.json"


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=16, help="generated videos (16)")
    p.add_argument("--frames", type=int, default=300, help="frames per video (300)")
    p.add_argument("--size", default="320x240", help="WxH (320x240)")
    p.add_argument("--gop", type=int, default=30, help="keyframe interval (30)")
    p.add_argument("--segments", type=int, default=8, help="frames per clip, TSN segments (8)")
    p.add_argument("--rounds", type=int, default=2, help="passes over the files per setting (2)")
    p.add_argument("--json", default=str(RESULT), help="where to write the figures")
    return p.parse_args()


def _versions() -> dict[str, str]:
    import av
    import decord
    import torch

    return {
        "python": platform.python_version(),
        "decord": decord.__version__,
        "av": av.__version__,
        "pyav_ffmpeg": ".".join(str(v) for v in av.library_versions.get("libavcodec", ())),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


def _time_decoders(args: argparse.Namespace, content: str, paths: list[str], megabytes: float) -> list[dict]:
    """Clips per second of each decoder on the same TSN test and train clips of ``paths``."""
    from vitssl.video import io
    from vitssl.video.samplers import segment_indices

    rng = np.random.default_rng(0)
    clips = {
        "tsn_test": [(p, segment_indices(args.frames, args.segments, train=False)) for p in paths],
        "tsn_train": [(p, segment_indices(args.frames, args.segments, train=True, rng=rng)) for p in paths],
    }

    def read(decoder: str, path: str, indices: np.ndarray) -> np.ndarray:
        if decoder == "decord":
            return io.read_frames(path, indices, decoder="decord").numpy()
        wanted = np.unique(indices)
        batch = io._read_pyav(path, wanted, io._index(path), seek=decoder == "pyav_seek", threads=1)
        return batch[np.searchsorted(wanted, indices)]

    results = []
    for sampling, items in clips.items():
        for decoder in ("decord", "pyav_seek", "pyav_sequential"):
            for path, indices in items[:2]:  # warm-up and exactness check
                got = [decode_index(f) for f in read(decoder, path, indices)]
                assert got == indices.tolist(), (decoder, path, indices, got)
            order = [items[i] for r in range(args.rounds) for i in np.random.default_rng(r).permutation(len(items))]
            t0 = time.perf_counter()
            for path, indices in order:
                read(decoder, path, indices)
            rate = len(order) / (time.perf_counter() - t0)
            results.append(
                {
                    "content": content,
                    "mb_per_file": round(megabytes, 3),
                    "sampling": sampling,
                    "decoder": decoder,
                    "clips": len(order),
                    "clips_per_s": round(rate, 2),
                }
            )
            print(f"  {sampling:10s} {decoder:16s} {rate:8.1f} clips/s ({1000 / rate:.1f} ms per clip)")
    return results


def main(args: argparse.Namespace) -> dict:
    import torch

    from vitssl.video import io

    torch.set_num_threads(1)
    width, height = (int(v) for v in args.size.split("x"))
    results: list[dict] = []
    index_ms: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for content in ("flat", "textured"):
            t0 = time.perf_counter()
            paths = [
                str(
                    write_video(
                        Path(tmp) / f"{content}{i:02d}.mp4",
                        args.frames,
                        width,
                        height,
                        30,
                        gop=args.gop,
                        texture=content == "textured",
                    )
                )
                for i in range(args.files)
            ]
            megabytes = sum(Path(p).stat().st_size for p in paths) / len(paths) / 1e6
            print(
                f"{content}: {args.files} videos of {args.frames} frames {args.size}, {megabytes:.2f} MB each, "
                f"written in {time.perf_counter() - t0:.1f} s"
            )
            t0 = time.perf_counter()
            infos = [io.probe(p) for p in paths]
            index_ms[content] = 1000 * (time.perf_counter() - t0) / len(paths)
            assert all(info.num_frames == args.frames and info.decoder == "decord" for info in infos)
            print(f"  index + probe: {index_ms[content]:.1f} ms per file (once per file and worker)")
            results += _time_decoders(args, content, paths, megabytes)

    summary = {}
    for content, sampling in sorted({(r["content"], r["sampling"]) for r in results}):
        same = [r for r in results if r["content"] == content and r["sampling"] == sampling]
        rates = {r["decoder"]: r["clips_per_s"] for r in same}
        baseline = max(("pyav_seek", "pyav_sequential"), key=rates.__getitem__)
        speedup = rates["decord"] / rates[baseline]
        summary[f"{content}/{sampling}"] = {"baseline": baseline, "decord_speedup_over_baseline": round(speedup, 3)}
        print(f"{content}/{sampling}: decord / {baseline} (the faster PyAV) = {speedup:.2f}x")
    report = {
        "benchmark": "clips per second, 8-frame TSN clips, random access, one decoding thread",
        "config": {**{k: v for k, v in vars(args).items() if k != "json"}, "codec": "h264 (x264 ultrafast, crf 18)"},
        "index_ms_per_file": index_ms,
        "versions": _versions(),
        "results": results,
        "summary": summary,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main(_parse())
