"""Shared pytest fixtures. Each area keeps its fixtures in its own delimited block."""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------------------
# launch: a real single-node SLURM cluster for tests marked `slurm` (owner: launch; see tests/slurm_cluster.py)
# ---------------------------------------------------------------------------------------------------------
import os

import pytest


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """munged + slurmctld + slurmd on this host for the whole session; ``SLURM_CONF`` points at it.

    Skipped (with the reason) where SLURM is not installed or cannot start; in CI (``CI=true``) a cluster
    that is installed but does not start fails the tests instead, so a broken setup cannot hide.
    """
    from slurm_cluster import ClusterStartError, SlurmCluster, missing_binaries

    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM is not installed here ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0 and not _in_ci():
        pytest.skip("the SLURM test cluster starts munged/slurmctld/slurmd as root; this session is not root")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterStartError as err:
        if _in_ci():
            pytest.fail(f"SLURM is installed but the test cluster did not start (CI must run these tests):\n{err}")
        pytest.skip(f"the SLURM test cluster did not start:\n{err}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def local_two_process_run(tmp_path_factory: pytest.TempPathFactory):
    """The tiny recipe pretrained by the local launcher in 2 gloo processes: ``(run_dir, TrainResult)``.

    Shared by the local-launch test and the SLURM tests that compare their weights with it.
    """
    from vitssl.config import load_config
    from vitssl.launch import launch

    out = tmp_path_factory.mktemp("local_2proc")
    cfg = load_config("pretrain/test_tiny", [f"output_dir={out}", "launch.tasks_per_node=2"])
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the SLURM jobs compared with this run use one thread per rank too
    try:
        return out, launch("vitssl.engine:train", cfg)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved


# ------------------------------------------------------------------------------------------ end of launch
