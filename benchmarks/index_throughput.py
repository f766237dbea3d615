"""Retrieval index build time, query throughput and recall@10 for Flat, IVF, IVF-PQ and HNSW (vitssl.index.core).

Corpus and queries are the clustered synthetic features of ``knn_vs_sklearn.py`` (L2-normalised, inner
product). Recall@10 is measured against exact search (``faiss.knn`` on the same vectors), the intersection of the
top-10 sets averaged over queries. Every index is built with ``retrieval.build_index`` (training on the whole
corpus where the factory needs it) and searched with all queries in one call, best of ``--repeats``.

Run: ``python benchmarks/index_throughput.py [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20k corpus, 1k queries, 256 IVF lists")
    p.add_argument("--corpus", type=int, default=100_000, help="indexed vectors")
    p.add_argument("--queries", type=int, default=10_000, help="query vectors")
    p.add_argument("--dim", type=int, default=384, help="vector dimension")
    p.add_argument("--nlist", type=int, default=1024, help="IVF lists")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (recall@k)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OpenMP / BLAS threads")
    p.add_argument("--repeats", type=int, default=2, help="timed searches per setting; the best is reported")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args()
    if args.quick:
        args.corpus, args.queries, args.nlist = 20_000, 1_000, 256
    return args


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    # Thread pools size themselves when their libraries load, so this precedes the numpy/faiss imports.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

from knn_vs_sklearn import blas_kernels, clustered_features  # noqa: E402


def main(args: argparse.Namespace) -> list[dict]:
    from vitssl.eval import knn
    from vitssl.index import core as retrieval

    faiss = knn.faiss
    corpus, _ = clustered_features(args.corpus, args.dim, 100, seed=0, sample_seed=1)
    queries, _ = clustered_features(args.queries, args.dim, 100, seed=0, sample_seed=2)
    corpus, queries = knn.normalize_features(corpus), knn.normalize_features(queries)
    print(f"corpus {corpus.shape}, queries {queries.shape}, k={args.k}, threads={args.threads}")
    print("BLAS:", "; ".join(blas_kernels()), "| OPENBLAS_CORETYPE =", os.environ.get("OPENBLAS_CORETYPE"))
    _, exact = faiss.knn(queries, corpus, args.k, metric=faiss.METRIC_INNER_PRODUCT)

    nl = args.nlist
    settings = [
        ("Flat", [{}]),
        (f"IVF{nl},Flat", [{"nprobe": p} for p in (8, 32, 128)]),
        (f"IVF{nl},PQ32", [{"nprobe": p} for p in (8, 32, 128)]),
        ("HNSW32", [{"efSearch": e} for e in (32, 64, 128)]),
    ]
    rows = []
    print(f"| index | build s | size MB | search params | queries/s | recall@{args.k} |")
    print("|---|---:|---:|---|---:|---:|")
    for factory, params in settings:
        t0 = time.perf_counter()
        # CPU figures (--threads): a GPU faiss build would otherwise train and fill the IVF indexes on the GPU.
        index = retrieval.build_index(corpus, factory, normalize=False, use_gpu=False)
        build_s = time.perf_counter() - t0
        size_mb = faiss.serialize_index(index).nbytes / 2**20
        for p in params:
            retrieval.set_search_params(index, p.get("nprobe"), p.get("efSearch"))
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                _, ids = index.search(queries, args.k)
                best = min(best, time.perf_counter() - t0)
            row = {
                "factory": factory,
                "build_seconds": build_s,
                "size_mb": size_mb,
                "params": p,
                "queries_per_second": len(queries) / best,
                "recall": retrieval.recall_at_k(ids, exact, args.k),
            }
            rows.append(row)
            ptxt = ", ".join(f"{k}={v}" for k, v in p.items()) or "exact"
            print(
                f"| {factory} | {build_s:.1f} | {size_mb:.0f} | {ptxt} | {row['queries_per_second']:,.0f} | "
                f"{row['recall']:.3f} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {"corpus": list(corpus.shape), "queries": len(queries), "threads": args.threads, "rows": rows},
                f,
                indent=2,
            )
    return rows


if __name__ == "__main__":
    main(ARGS)
