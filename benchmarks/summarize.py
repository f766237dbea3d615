"""Markdown tables from the benchmark JSON files in ``benchmarks/results`` (what ``RESULTS.md`` quotes).

python benchmarks/summarize.py            # every table whose JSON exists
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def engine_overhead(d: dict) -> str:
    runs = lambda xs: ", ".join(f"{x:.3f}" for x in xs)
    return "\n".join(
        [
            f"torch {d['torch']}, {d['threads']} threads, {d['steps']} timed steps per run; baseline: {d['baseline']}",
            "",
            "| loop | steps/s (runs) |",
            "|---|---|",
            f"| bare | {runs(d['bare_steps_per_s'])} |",
            f"| engine | {runs(d['engine_steps_per_s'])} |",
            "",
            f"Overhead: {d['overhead_percent']:+.1f} % time per step (median of runs; goal <= 5 %).",
        ]
    )


def knn_vs_sklearn(d: dict) -> str:
    return "\n".join(
        [
            f"train {tuple(d['train'])}, queries {tuple(d['queries'])}, k = {d['k']}, T = {d['temperature']}, "
            f"{d['threads']} threads; BLAS: {'; '.join(d['blas'])}",
            "",
            "| scikit-learn | vitssl `knn_predict` | floor (bare faiss search) | speed-up | same predictions | top-1 |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {d['sklearn_seconds']:.2f} s | {d['ours_seconds']:.2f} s | {d['faiss_search_seconds']:.2f} s | "
            f"**{d['speedup']:.2f}x** | {100 * d['agreement']:.2f} % | {d['top1_ours']:.2f} % |",
        ]
    )


def index_throughput(d: dict) -> str:
    lines = [
        f"corpus {tuple(d['corpus'])}, {d['queries']} queries, {d['threads']} threads",
        "",
        "| index | build s | size MB | search params | queries/s | recall@10 |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for r in d["rows"]:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "exact"
        lines.append(
            f"| {r['factory']} | {r['build_seconds']:.1f} | {r['size_mb']:.0f} | {params} | "
            f"{r['queries_per_second']:,.0f} | {r['recall']:.3f} |"
        )
    return "\n".join(lines)


def video_reading(d: dict) -> str:
    lines = ["| content | clips | decoder | clips/s |", "|---|---|---|---:|"]
    for r in d["results"]:
        lines.append(f"| {r['content']} | {r['sampling']} | {r['decoder']} | {r['clips_per_s']:.1f} |")
    return "\n".join(lines)


def video_retrieval(d: dict) -> str:
    names = {
        "tca": "TCA (video vectors)",
        "tca_chamfer": "TCA_f (chamfer)",
        "whitened_mean_frames": "mean of whitened frames",
        "mean_frames": "mean of frames",
        "thumbnails": "thumbnails",
    }
    q = d["quality"]
    lines = ["| method | mAP | R@5 | R@10 |", "|---|---:|---:|---:|"]
    for m, name in names.items():
        if m in q:
            lines.append(f"| {name} | {q[m]['mAP']:.3f} | {q[m]['recall@5']:.3f} | {q[m]['recall@10']:.3f} |")
    s = d["speed"]
    lines += ["", f"database {s['database']} videos", "", "| model | build videos/s |", "|---|---:|"]
    lines += [f"| {m} | {b['videos_per_second']:.1f} |" for m, b in s["build"].items()]
    for m, search in s["search"].items():
        lines += ["", f"{m}: {search['queries']} queries", "", "| search | K | mAP | R@10 | ms/query |"]
        lines.append("|---|---:|---:|---:|---:|")
        for r in search["rows"]:
            lines.append(
                f"| {r['method']} | {r['K'] or ''} | {r['mAP']:.3f} | {r['recall@10']:.3f} | {r['ms_per_query']:.2f} |"
            )
    return "\n".join(lines)


def track_fps(d: dict) -> str:
    lines = [
        f"{d['threads']} thread(s), input {d['input_size'][0]}x{d['input_size'][1]}, checkpoint {d['checkpoint']}",
        "",
        "| tracker | frames/s | backbone ms | transformer ms | association ms | MOTA | IDF1 | IDSW |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, r in d["modes"].items():
        ms = r["ms_per_frame"]
        lines.append(
            f"| {mode} | {r['fps']:.1f} | {ms['backbone']:.2f} | {ms['transformer']:.2f} | {ms['association']:.2f} | "
            f"{100 * r['MOTA']:.1f} | {100 * r['IDF1']:.1f} | {r['IDSW']} |"
        )
    return "\n".join(lines)


def main() -> None:
    for name, render in (
        ("engine_overhead", engine_overhead),
        ("knn_vs_sklearn", knn_vs_sklearn),
        ("index_throughput", index_throughput),
        ("video_reading", video_reading),
        ("video_retrieval", video_retrieval),
        ("track_fps", track_fps),
    ):
        data = _load(name)
        if data is not None:
            print(f"### {name}\n\n{render(data)}\n")


if __name__ == "__main__":
    main()
