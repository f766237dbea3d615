"""Shared pytest fixtures. Each area keeps its fixtures in its own delimited block."""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------------------
# launch: a real single-node SLURM cluster for tests marked `slurm` (owner: launch; see tests/slurm_cluster.py)
# ---------------------------------------------------------------------------------------------------------
import os

import pytest

import vitssl.ssl  # noqa: F401  (registers the objectives, as the vitssl command does before reading a config)


def _slurm_required() -> bool:
    """``.ci/run`` installs SLURM and sets VITSSL_REQUIRE_SLURM=1: there a SLURM test may not skip."""
    return os.environ.get("VITSSL_REQUIRE_SLURM", "").strip().lower() in ("1", "true", "yes")


def _skip_or_fail(reason: str) -> None:
    if _slurm_required():
        pytest.fail(f"VITSSL_REQUIRE_SLURM is set but the SLURM tests cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """munged + slurmctld + slurmd on this host for the whole session; ``SLURM_CONF`` points at it.

    Skipped (with the reason) where SLURM is not installed or cannot start; with ``VITSSL_REQUIRE_SLURM=1``
    (set by ``.ci/run``, which installs SLURM) each of those is a failure instead, so a broken setup cannot hide.
    """
    from tests.slurm_cluster import ClusterStartError, SlurmCluster, missing_binaries

    missing = missing_binaries()
    if missing:
        _skip_or_fail(f"SLURM is not installed here ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        _skip_or_fail("the SLURM test cluster starts munged/slurmctld/slurmd as root; this session is not root")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterStartError as err:
        _skip_or_fail(f"the SLURM test cluster did not start:\n{err}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def local_two_process_run(tmp_path_factory: pytest.TempPathFactory):
    """The tiny recipe pretrained by the local launcher in 2 gloo processes: ``(run_dir, TrainResult)``.

    Shared by the local-launch test and the SLURM tests that compare their weights with it.
    """
    from vitssl.cli.pretrain import PRETRAIN_TARGET, PretrainJob
    from vitssl.config import load_config
    from vitssl.launch import launch

    out = tmp_path_factory.mktemp("local_2proc")
    cfg = load_config("pretrain/test_tiny", [f"output_dir={out}", "launch.tasks_per_node=2"])
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the SLURM jobs compared with this run use one thread per rank too
    try:
        return out, launch(PRETRAIN_TARGET, PretrainJob.from_config(cfg), cfg.launch, cfg.output_dir)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved


# ------------------------------------------------------------------------------------------ end of launch


@pytest.fixture
def one_thread():
    """Tiny matrices on a shared 2-core machine: one torch thread (more cost more than they save), as the video
    demos run. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# video: decoder="auto" caches its per-machine measurement (owner: video/io, vitssl.video.reader_choice)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _video_reader_cache(tmp_path_factory: pytest.TempPathFactory):
    """Tests (and the commands they start) cache ``auto``'s reader measurement in a session folder, never in the
    user's ~/.cache: it is measured once a test session."""
    saved = os.environ.get("VITSSL_CACHE_DIR")
    os.environ["VITSSL_CACHE_DIR"] = str(tmp_path_factory.mktemp("vitssl_cache"))
    yield
    if saved is None:
        os.environ.pop("VITSSL_CACHE_DIR", None)
    else:
        os.environ["VITSSL_CACHE_DIR"] = saved


# ------------------------------------------------------------------------------------------- end of video
