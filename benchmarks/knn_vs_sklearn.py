"""Weighted k-NN (DINO protocol): vitssl's faiss path vs scikit-learn's brute-force KNeighborsClassifier.

Both sides classify the same queries with the same formula: cosine similarity, the k nearest training features,
votes weighted exp(sim / T) (scikit-learn: ``weights=lambda d: exp((1 - d) / T)`` on cosine distances). Reported:
prediction agreement, seconds for each side (best of ``--repeats``), their ratio, and the bare faiss search as
the compute floor of exact search. Both sides get the same thread count (``--threads``: OMP_NUM_THREADS, BLAS
threads and scikit-learn's ``n_jobs``) and run under the same OpenBLAS settings; the kernels each BLAS uses are
printed, since ``OPENBLAS_CORETYPE`` changes them (see vitssl/eval/knn.py).

Optionally (``--approx``) an IVF index stands in for exact search; its predictions are clearly labelled
approximate and reported with their agreement with the exact ones.

Run: ``python benchmarks/knn_vs_sklearn.py [--quick] [--threads N] [--approx]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20k x 384 train, 2k queries")
    p.add_argument("--train", type=int, default=100_000, help="training features")
    p.add_argument("--queries", type=int, default=10_000, help="query features")
    p.add_argument("--dim", type=int, default=384, help="feature dimension")
    p.add_argument("--classes", type=int, default=100, help="number of classes")
    p.add_argument("--k", type=int, default=20, help="neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="vote temperature T")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both sides")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side; the best is reported")
    p.add_argument("--approx", action="store_true", help="also time an IVF (approximate) search path")
    p.add_argument("--floor-only", action="store_true", help="only time the bare faiss search (BLAS kernel probe)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args()
    if args.quick:
        args.train, args.queries = 20_000, 2_000
    return args


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    # Thread pools size themselves when their libraries load, so this precedes the numpy/torch/faiss imports.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered_features(
    n: int,
    dim: int,
    num_classes: int,
    seed: int,
    sample_seed: int,
    superclasses: int = 10,
    modes_per_class: int = 4,
    rank: int = 16,
    spread: float = 0.3,
    noise: float = 0.02,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic SSL-like features: superclasses > classes > modes, varying along a few shared directions.

    Class centres scatter around ``superclasses`` centres, each class has ``modes_per_class`` modes; a sample is
    its mode plus ``spread`` x a ``rank``-dimensional variation shared by its superclass (so neighbouring
    classes overlap, like real features, and the data has the low intrinsic dimension approximate indexes
    rely on) plus small isotropic ``noise``, times a random magnitude (unnormalised, as backbone features are).
    Centres depend on ``seed`` only, so train and query sets drawn with different ``sample_seed`` share them.

    Returns:
        ``(features (n, dim) float32, labels (n,) int64)``.
    """
    rng = np.random.default_rng(seed)
    supers = _unit(rng.standard_normal((superclasses, dim)))  # (S, D)
    centres = _unit(
        supers[np.arange(num_classes) % superclasses] + 0.35 * _unit(rng.standard_normal((num_classes, dim)))
    )
    modes = _unit(centres[:, None, :] + 0.35 * _unit(rng.standard_normal((num_classes, modes_per_class, dim))))
    bases = (rng.standard_normal((superclasses, dim, rank)) / np.sqrt(dim)).astype(np.float32)  # (S, D, r)
    srng = np.random.default_rng(sample_seed)
    labels = srng.integers(0, num_classes, n)
    feats = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 8192):  # chunks keep the (chunk, D, r) gather small
        lab = labels[start : start + 8192]
        z = srng.standard_normal((len(lab), rank)).astype(np.float32)
        x = modes[lab, srng.integers(0, modes_per_class, len(lab))]
        x = x + spread * np.einsum("ndr,nr->nd", bases[lab % superclasses], z)
        x = x + noise * srng.standard_normal((len(lab), dim))
        feats[start : start + len(lab)] = x * srng.uniform(0.5, 2.0, (len(lab), 1))
    return feats, labels.astype(np.int64)


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def blas_kernels() -> list[str]:
    import threadpoolctl

    return [
        f"{i['prefix']} {i.get('version')} {i.get('architecture')} x{i['num_threads']}"
        for i in threadpoolctl.threadpool_info()
        if i["user_api"] == "blas"
    ]


def main(args: argparse.Namespace) -> dict:
    from sklearn.neighbors import KNeighborsClassifier

    from vitssl.eval import knn
    from vitssl.index import core as retrieval

    faiss = knn.faiss
    train, train_labels = clustered_features(args.train, args.dim, args.classes, seed=0, sample_seed=1)
    queries, query_labels = clustered_features(args.queries, args.dim, args.classes, seed=0, sample_seed=2)
    t, k, reps = args.temperature, args.k, args.repeats
    print(f"train {train.shape}, queries {queries.shape}, k={k}, T={t}, threads={args.threads}", flush=True)
    print("BLAS:", "; ".join(blas_kernels()), "| OPENBLAS_CORETYPE =", os.environ.get("OPENBLAS_CORETYPE"))

    if args.floor_only:
        train_n, queries_n = knn.normalize_features(train), knn.normalize_features(queries)
        sec, _ = _best(lambda: faiss.knn(queries_n, train_n, k, metric=faiss.METRIC_INNER_PRODUCT), reps)
        gflops = 2 * train.shape[0] * queries.shape[0] * train.shape[1] / sec / 1e9
        print(f"bare faiss search: {sec:.2f} s, {gflops:.0f} GFLOP/s")
        return {"faiss_search_seconds": sec, "gflops": gflops, "blas": blas_kernels()}

    # Ours: the whole path the CLI runs on raw features (normalise, exact search, vote, argmax).
    ours_s, scores = _best(lambda: knn.knn_predict(train, train_labels, queries, k, t, args.classes), reps)
    ours_pred = scores.argmax(1)
    train_n = knn.normalize_features(train)
    queries_n = knn.normalize_features(queries)
    floor_s, _ = _best(lambda: faiss.knn(queries_n, train_n, k, metric=faiss.METRIC_INNER_PRODUCT), reps)
    print(f"vitssl knn_predict: {ours_s:.2f} s (bare faiss search on normalised features: {floor_s:.2f} s)")

    clf = KNeighborsClassifier(
        n_neighbors=k, algorithm="brute", metric="cosine", weights=lambda d: np.exp((1.0 - d) / t), n_jobs=args.threads
    )
    clf.fit(train, train_labels)
    sk_s, sk_pred = _best(lambda: clf.predict(queries), reps)
    agree = float((sk_pred == ours_pred).mean())
    print(f"scikit-learn KNeighborsClassifier: {sk_s:.2f} s")
    print(
        f"agreement {agree * 100:.3f}% ({int((sk_pred != ours_pred).sum())} differ), "
        f"speed-up {sk_s / ours_s:.2f}x (floor {sk_s / floor_s:.2f}x); top-1 ours "
        f"{(ours_pred == query_labels).mean() * 100:.2f}%, sklearn {(sk_pred == query_labels).mean() * 100:.2f}%"
    )
    out = {
        "train": list(train.shape),
        "queries": list(queries.shape),
        "k": k,
        "temperature": t,
        "threads": args.threads,
        "blas": blas_kernels(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "ours_seconds": ours_s,
        "faiss_search_seconds": floor_s,
        "sklearn_seconds": sk_s,
        "speedup": sk_s / ours_s,
        "agreement": agree,
        "top1_ours": float((ours_pred == query_labels).mean() * 100),
    }
    if args.approx:
        nlist = 1024 if args.train >= 64_000 else 256
        build_s, index = _best(lambda: retrieval.build_index(train_n, f"IVF{nlist},Flat", seed=0), 1)
        for nprobe in (8, 32):
            retrieval.set_search_params(index, nprobe=nprobe)
            sec, (sims, idx) = _best(lambda: index.search(queries_n, k), reps)
            pred = knn.knn_scores_from_neighbours(sims, idx, train_labels, t, args.classes).argmax(1)
            a = float((pred == ours_pred).mean())
            print(
                f"APPROXIMATE IVF{nlist},Flat nprobe={nprobe}: search {sec:.2f} s (+ build {build_s:.2f} s), "
                f"agreement with exact {a * 100:.2f}%, speed-up of the search vs sklearn {sk_s / sec:.1f}x"
            )
            out[f"approx_ivf{nlist}_nprobe{nprobe}"] = {"search_seconds": sec, "build_seconds": build_s, "agreement": a}
    out["machine"] = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main(ARGS)
