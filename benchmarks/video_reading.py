"""Clips per second reading 8-frame TSN clips with random access: each reader on original vs prepared files.

Generates ``--files`` h264 mp4 files (``--frames`` frames of ``--size``, a keyframe every ``--gop`` frames: web
and camera videos carry one every few seconds; x264 ultrafast / crf 18, no B-frames) of a "textured" content (a
panning grainy texture, about 1.2 Mbit/s at 320x240: decoding dominates). ``vitssl.video.prepare`` re-encodes
them with a keyframe every ``--prepared-gop`` frames. Each reader of ``vitssl.video.io.read_frames``
(torchcodec, PyAV, decord) then reads the same clips, file order shuffled: TSN test clips (segment centres) and
TSN train clips (seeded random offsets), one decoding thread (as in a DataLoader worker). torchcodec's decoder
is opened for every clip (an exact-mode open scans the file; a worker over a large dataset rarely meets the same
file twice). Every returned frame is checked against the index its pixels spell. The baseline is PyAV on the
original files, vitssl's reader before TorchCodec.

The per-file frame index (packet timestamps, the verified frame count) is built once per file before timing,
as a DataLoader worker does on its first visit; its cost is reported separately.

Run: ``python benchmarks/video_reading.py [--files 8] [--frames 300] [--rounds 2]``; writes
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
    p.add_argument("--files", type=int, default=8, help="generated videos (8)")
    p.add_argument("--frames", type=int, default=300, help="frames per video (300)")
    p.add_argument("--size", default="320x240", help="WxH (320x240)")
    p.add_argument("--gop", type=int, default=150, help="keyframe interval of the originals (150: 5 s at 30 fps)")
    p.add_argument("--prepared-gop", type=int, default=8, help="keyframe interval after vitssl video prepare (8)")
    p.add_argument("--segments", type=int, default=8, help="frames per clip, TSN segments (8)")
    p.add_argument("--rounds", type=int, default=2, help="passes over the files per setting (2)")
    p.add_argument("--json", default=str(RESULT), help="where to write the figures")
    return p.parse_args()


def _versions() -> dict[str, str]:
    import av
    import torch

    from vitssl.video.io import READERS, reader_version

    return {
        "python": platform.python_version(),
        **{name: reader_version(name) or "-" for name in READERS},
        "pyav_ffmpeg": ".".join(str(v) for v in av.library_versions.get("libavcodec", ())),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


def _time_readers(args: argparse.Namespace, files: str, paths: list[str], megabytes: float) -> list[dict]:
    """Clips per second of each reader on the same TSN test and train clips of ``paths``."""
    from vitssl.video import io
    from vitssl.video.samplers import segment_indices

    rng = np.random.default_rng(0)
    clips = {
        "tsn_test": [(p, np.asarray(segment_indices(args.frames, args.segments, train=False))) for p in paths],
        "tsn_train": [(p, np.asarray(segment_indices(args.frames, args.segments, train=True, rng=rng))) for p in paths],
    }
    readers = [r for r in io.READERS if io.reader_problem(r) is None]

    def read(reader: str, path: str, indices: np.ndarray) -> np.ndarray:
        io.clear_cache(indexes=False)  # torchcodec opens (and scans) the file again, as on a first visit
        return io.read_frames(path, indices, decoder=reader).numpy()

    results = []
    for sampling, items in clips.items():
        for reader in readers:
            for path, indices in items[:2]:  # warm-up and exactness check
                got = [decode_index(f) for f in read(reader, path, indices)]
                assert got == indices.tolist(), (reader, path, indices, got)
            order = [items[i] for r in range(args.rounds) for i in np.random.default_rng(r).permutation(len(items))]
            t0 = time.perf_counter()
            for path, indices in order:
                read(reader, path, indices)
            rate = len(order) / (time.perf_counter() - t0)
            results.append(
                {
                    "files": files,
                    "mb_per_file": round(megabytes, 3),
                    "sampling": sampling,
                    "reader": reader,
                    "clips": len(order),
                    "clips_per_s": round(rate, 2),
                }
            )
            print(f"  {files:9s} {sampling:10s} {reader:11s} {rate:8.1f} clips/s ({1000 / rate:.1f} ms per clip)")
    return results


def main(args: argparse.Namespace) -> dict:
    import torch

    from vitssl.video import io
    from vitssl.video.prepare import prepare_videos

    torch.set_num_threads(1)
    width, height = (int(v) for v in args.size.split("x"))
    results: list[dict] = []
    index_ms: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        (Path(tmp) / "original").mkdir()
        for i in range(args.files):
            write_video(Path(tmp) / "original" / f"v{i:02d}.mp4", args.frames, width, height, 30, gop=args.gop,
                        texture=True)  # fmt: skip
        t1 = time.perf_counter()
        prepare_videos(Path(tmp) / "original", Path(tmp) / "prepared", gop=args.prepared_gop)
        print(f"wrote {args.files} videos in {t1 - t0:.1f} s, prepared them in {time.perf_counter() - t1:.1f} s")
        for files in ("original", "prepared"):
            paths = sorted(str(p) for p in (Path(tmp) / files).glob("*.mp4"))
            megabytes = sum(Path(p).stat().st_size for p in paths) / len(paths) / 1e6
            t0 = time.perf_counter()
            infos = [io.probe(p) for p in paths]
            index_ms[files] = 1000 * (time.perf_counter() - t0) / len(paths)
            assert all(info.num_frames == args.frames and not info.damaged for info in infos)
            print(f"{files}: {megabytes:.2f} MB a file; index + probe {index_ms[files]:.1f} ms per file")
            results += _time_readers(args, files, paths, megabytes)

    rates = {(r["files"], r["sampling"], r["reader"]): r["clips_per_s"] for r in results}
    summary = {}
    for files, sampling, reader in sorted(rates):
        baseline = rates[("original", sampling, "pyav")]
        summary[f"{files}/{sampling}/{reader}"] = {
            "speedup_over_pyav_original": round(rates[(files, sampling, reader)] / baseline, 3),
            "speedup_prepared_over_original": round(
                rates[("prepared", sampling, reader)] / rates[("original", sampling, reader)], 3
            ),
        }
    for key, value in summary.items():
        print(f"{key}: {value['speedup_over_pyav_original']:.2f}x PyAV on the originals")
    report = {
        "benchmark": "clips per second, 8-frame TSN clips, random access, one decoding thread, original vs prepared",
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
