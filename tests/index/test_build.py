"""Index building (vitssl.index.core): one warning instead of faiss's k-means chatter, and the GPU decision."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from vitssl.index import _gpu, core
from vitssl.index.core import faiss

D = 16


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------------------------------------------
# Training noise
# --------------------------------------------------------------------------------------------------------------


def test_small_ivf_logs_one_warning_and_nothing_on_c_stderr(caplog, capfd):
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        index = core.build_index(_vectors(300), "IVF16,Flat", use_gpu=False)
    assert index.ntotal == 300
    [message] = _warnings(caplog)
    assert "training 'IVF16,Flat' on 300 vectors" in message and "624 for the 16 IVF lists" in message
    assert "e.g. 'IVF4,Flat'" in message  # 300 / 39 = 7.7 -> 4 lists
    assert capfd.readouterr().err == ""  # faiss's "WARNING clustering 300 points to 16 centroids ..." is gone


def test_ivf_pq_logs_one_warning_for_all_its_codebooks(caplog, capfd):
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        core.build_index(_vectors(700), "IVF4,PQ4x6", use_gpu=False)  # 4 PQ codebooks of 64 centroids each
    [message] = _warnings(caplog)
    assert "2496 for the 64 centroids per PQ codebook" in message and "IVF lists" not in message
    assert "e.g. 'IVF4,PQ4x4'" in message  # 700 / 39 = 17.9 -> 16 centroids = 4 bits
    assert capfd.readouterr().err == ""


def test_opq_trains_quietly_and_forgets_the_lent_quantizer(caplog, capfd):
    index = core.new_index("OPQ4,IVF4,PQ4x4", D)
    opq = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
    opq.niter = 2  # faiss's default 50 iterations only cost time here
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        trained = core._train(index, _vectors(400), "OPQ4,IVF4,PQ4x4", use_gpu=False)
    assert trained.is_trained and opq.pq is None
    assert len(_warnings(caplog)) == 1 and "per OPQ codebook" in _warnings(caplog)[0]
    assert capfd.readouterr().err == ""


def test_enough_training_vectors_log_nothing(caplog, capfd):
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        core.build_index(_vectors(700), "IVF16,Flat", use_gpu=False)  # 700 >= 39 x 16
    assert not _warnings(caplog) and capfd.readouterr().err == ""


def test_suggested_factories():
    assert core._suggest_factory("IVF4096,Flat", 1000) == "e.g. 'IVF16,Flat', or 'Flat' for exact search"
    assert core._suggest_factory("IVF16,PQ8", 3000) == "e.g. 'IVF16,PQ8x6', or 'Flat' for exact search"
    assert core._suggest_factory("IVF16,PQ8", 20000) == "e.g. 'IVF16,PQ8', or 'Flat' for exact search"
    assert "'OPQ8,IVF2,PQ8x4fs'" in core._suggest_factory("OPQ8,IVF16,PQ8x4fs", 100)  # fast-scan keeps 4 bits


# --------------------------------------------------------------------------------------------------------------
# GPU decision (faiss GPU builds only run it for real; here the converters are stand-ins that copy on the CPU)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def fake_gpu(monkeypatch):
    """Pretend faiss sees a GPU; "moving" an index clones it on the CPU and is recorded."""
    calls: list[str] = []

    def to_gpu(index):
        calls.append("to_gpu")
        return faiss.clone_index(index)

    def to_cpu(index):
        calls.append("to_cpu")
        return faiss.clone_index(index)

    monkeypatch.setattr(_gpu, "gpu_available", lambda: True)
    monkeypatch.setattr(_gpu, "index_cpu_to_gpu", to_gpu)
    monkeypatch.setattr(_gpu, "index_gpu_to_cpu", to_cpu)
    return calls


@pytest.mark.parametrize(
    ("factory", "k", "nprobe", "auto"),
    [
        ("Flat", 10, 1, True),
        ("IVF16,Flat", 10, 8, True),
        ("Flat", 4096, 1, False),  # beyond the GPU's k
        ("IVF16,Flat", 10, 4096, False),  # beyond the GPU's nprobe
        ("HNSW8", 10, 1, False),  # no GPU version
        ("IVF16,PQ4", 10, 1, False),  # GPU version with limits of its own: kept on the CPU
        ("IVF16_HNSW8,Flat", 10, 1, False),  # would come back with a flat quantizer
    ],
)
def test_gpu_decision(monkeypatch, factory, k, nprobe, auto):
    index = core.new_index(factory, D)
    monkeypatch.setattr(_gpu, "gpu_available", lambda: True)
    assert _gpu.decide_gpu(index, None, k, nprobe) is auto
    assert _gpu.decide_gpu(index, False, k, nprobe) is False
    if auto:
        assert _gpu.decide_gpu(index, True, k, nprobe) is True
    else:
        with pytest.raises(ValueError, match="use_gpu=True: faiss runs Flat and IVF-Flat"):
            _gpu.decide_gpu(index, True, k, nprobe)
    monkeypatch.setattr(_gpu, "gpu_available", lambda: False)
    assert _gpu.decide_gpu(index, None, k, nprobe) is False
    with pytest.raises(RuntimeError, match="no GPU support or sees no GPU"):
        _gpu.decide_gpu(index, True, k, nprobe)


@pytest.mark.skipif(core.gpu_available(), reason="faiss sees a GPU here")
def test_cpu_fallback_when_faiss_has_no_gpu(tmp_path):
    x = _vectors(800)
    with pytest.raises(RuntimeError, match="use_gpu=False"):
        core.build_index(x, "IVF16,Flat", use_gpu=True)
    out = core.build_index_dir(tmp_path / "idx", x, [str(i) for i in range(800)], "IVF16,Flat")  # auto: the CPU
    assert core.search(out, x[:5], 3)[1][:, 0].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="no GPU support"):
        core.search(out, x[:5], 3, use_gpu=True)


def test_ivf_trains_and_fills_on_the_gpu_and_comes_back(fake_gpu, tmp_path):
    x = _vectors(800)
    reference = core.build_index(x, "IVF16,Flat", use_gpu=False)
    assert fake_gpu == []
    index = core.build_index(x, "IVF16,Flat")  # auto: the (pretend) GPU
    assert fake_gpu == ["to_gpu", "to_cpu", "to_gpu", "to_cpu"]  # train, then add; a CPU index comes back
    np.testing.assert_array_equal(index.search(x[:20], 5)[1], reference.search(x[:20], 5)[1])
    fake_gpu.clear()
    core.build_index(x, "Flat")  # adding to Flat is a copy: no GPU round trip
    core.build_index(x, "HNSW8")
    core.build_index(x, "IVF16,Flat", use_gpu=False)  # the opt-out
    assert fake_gpu == []


def test_search_copies_to_the_gpu_once_and_keeps_overrides_per_call(fake_gpu, tmp_path):
    x = _vectors(800)
    out = core.build_index_dir(tmp_path / "ivf", x, [str(i) for i in range(800)], "IVF16,Flat", use_gpu=False)
    loaded = core.load_index_dir(out)
    cpu = core.search(loaded, x[:10], 5, use_gpu=False)
    assert fake_gpu == []
    first = core.search(loaded, x[:10], 5)
    exact = core.search(loaded, x[:10], 5, nprobe=16)
    again = core.search(loaded, x[:10], 5)
    assert fake_gpu == ["to_gpu"]  # one copy, reused
    gpu_copy = faiss.extract_index_ivf(loaded._gpu_index)
    assert gpu_copy.nprobe == 8 and faiss.extract_index_ivf(loaded.index).nprobe == 8  # the override lasted one call
    np.testing.assert_array_equal(first[1], cpu[1])
    np.testing.assert_array_equal(again[1], cpu[1])
    assert core.recall_at_k(cpu[1], exact[1], 5) <= 1.0
    assert core.search(loaded, x[:2], 4096)[1].shape == (2, 4096)  # k beyond the GPU's: the CPU index
    assert fake_gpu == ["to_gpu"]
    assert core.evaluate_index(loaded, x[:10], k=5)["recall"]["5"] > 0.5


@pytest.mark.skipif(not core.gpu_available(), reason="faiss has no GPU support or sees no GPU")
def test_real_gpu_build_and_search(tmp_path):
    x = _vectors(5000)
    out = core.build_index_dir(tmp_path / "gpu", x, [str(i) for i in range(5000)], "IVF64,Flat", use_gpu=True)
    loaded = core.load_index_dir(out)  # what the GPU built was written as a CPU index
    _, on_gpu = core.search(loaded, x[:100], 10, nprobe=64, use_gpu=True)
    _, on_cpu = core.search(loaded, x[:100], 10, nprobe=64, use_gpu=False)
    assert core.recall_at_k(on_gpu, on_cpu, 10) >= 0.99
    flat = core.load_index_dir(core.build_index_dir(tmp_path / "flat", x, [str(i) for i in range(5000)]))
    assert core.recall_at_k(core.search(flat, x[:100], 10, use_gpu=True)[1], on_cpu, 10) >= 0.99
