"""A throw-away single-node SLURM cluster for the launch tests.

Starts munged, slurmctld and slurmd (as root, in the foreground, as child processes of the test session)
with a slurm.conf written into a private folder: private ports, state, spool, log and munge folders, a
freshly generated munge key, and one node named after this host with its real CPUs and memory. Client
commands (sbatch, squeue, scontrol, scancel, srun inside jobs) find the cluster through ``SLURM_CONF``,
which :meth:`SlurmCluster.start` exports into ``os.environ``.

Usable on its own for debugging::

    python tests/slurm_cluster.py /tmp/mycluster   # starts it, prints the SLURM_CONF line, Ctrl-C stops it
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

_logger = logging.getLogger(__name__)

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel")


class ClusterStartError(RuntimeError):
    """The cluster could not be started; the message holds the daemons' log tails."""


def missing_binaries() -> list[str]:
    """Names of the SLURM / munge programs that are not on PATH (or in /usr/sbin)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=path) is None]


def _which(name: str) -> str:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    found = shutil.which(name, path=path)
    if found is None:
        raise ClusterStartError(f"{name} is not installed (apt-get install slurm-wlm munge)")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_hardware() -> dict[str, str]:
    """The node line fields slurmd itself detects (CPUs, sockets, cores, threads, RealMemory)."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=60).stdout
    fields = dict(tok.split("=", 1) for tok in out.split() if "=" in tok)
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    hw = {key: fields[key] for key in keep if key in fields}
    if "CPUs" not in hw:  # slurmd -C failed: fall back to what Python sees
        hw = {"CPUs": str(os.cpu_count() or 1), "RealMemory": str(_mem_mb())}
    return hw


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


def _die_with_parent() -> None:
    """Runs in the forked child before exec: ask Linux to SIGTERM it when the test session dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux / no glibc: stop() at session end still stops the daemons


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


class SlurmCluster:
    """One munged + slurmctld + slurmd on this host, configured entirely under ``root``.

    Args:
        root: a fresh folder for the configuration, keys, state and logs.
        min_job_age_s: how long finished jobs stay visible to squeue / scontrol.
    """

    def __init__(self, root: str | Path, min_job_age_s: int = 120) -> None:
        self.root = Path(root).absolute()
        self.min_job_age_s = min_job_age_s
        self.hostname = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.logs = {
            "munged": self.root / "log" / "munged.log",
            "slurmctld": self.root / "log" / "slurmctld.log",
            "slurmd": self.root / "log" / "slurmd.log",
        }
        self._procs: dict[str, subprocess.Popen] = {}
        self._old_slurm_conf: str | None = None

    # --- setup -----------------------------------------------------------------------------------------------
    def _write_munge_key(self) -> Path:
        key_dir = self.root / "munge"
        key_dir.mkdir(parents=True, exist_ok=True)
        key_dir.chmod(0o700)  # munged refuses keys and sockets in folders others can write
        key = key_dir / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        return key

    def _write_conf(self) -> None:
        for sub in ("etc", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        hw = _node_hardware()
        node = " ".join(f"{k}={v}" for k, v in hw.items())
        lines = [
            "ClusterName=vitssltest",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",  # no DNS needed to reach the controller
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # requeued jobs wait for the job credential to expire (default 120 s) before they start again
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.logs['slurmctld']}",
            f"SlurmdLogFile={self.logs['slurmd']}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # no cgroups in containers: track processes through /proc, no task binding
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "ReturnToService=2",
            "JobRequeue=1",
            "MaxJobCount=1000",
            f"MinJobAge={self.min_job_age_s}",
            "KillWait=5",
            "InactiveLimit=0",
            "MessageTimeout=20",
            "SlurmdTimeout=300",
            "SlurmctldTimeout=300",
            # the node as slurmd detects it; config_overrides keeps it usable if the detection differs
            "SlurmdParameters=config_overrides",
            f"NodeName={self.hostname} NodeAddr=127.0.0.1 {node} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "ab")  # noqa: SIM115  (closed with the process)
        # A new session: Ctrl-C in the terminal does not reach the daemons before stop() can scancel jobs.
        # The parent-death signal: a test session that is killed outright does not leave daemons behind.
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent
        )
        out.close()
        self._procs[name] = proc

    def _failure(self, what: str) -> ClusterStartError:
        parts = [what]
        for name, log in self.logs.items():
            parts.append(f"--- {name}: {log} ---\n{_tail(log)}")
            stdout = self.root / "log" / f"{name}.stdout"
            if stdout.exists() and stdout.stat().st_size:
                parts.append(f"--- {name} stdout ---\n{_tail(stdout)}")
        return ClusterStartError("\n".join(parts))

    def _wait(self, what: str, ready, timeout_s: float, daemon: str | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if daemon is not None and self._procs[daemon].poll() is not None:
                raise self._failure(f"{daemon} exited with code {self._procs[daemon].returncode}")
            if ready():
                return
            time.sleep(0.3)
        raise self._failure(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def env(self) -> dict[str, str]:
        """Environment variables the client commands need to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        env = {**os.environ, **self.env()}
        return subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=timeout)

    def _node_state(self) -> str:
        res = self._run("sinfo", "-h", "-N", "-o", "%T")
        return res.stdout.strip().lower() if res.returncode == 0 else ""

    def start(self, timeout_s: float = 60) -> None:
        """Start the three daemons, wait until the node is idle and export ``SLURM_CONF``.

        Raises:
            ClusterStartError: with the daemons' log tails when something does not come up.
        """
        if os.geteuid() != 0:
            raise ClusterStartError("the test cluster runs its daemons as root; this session is not root")
        self.root.mkdir(parents=True, exist_ok=True)
        key = self._write_munge_key()
        self._write_conf()
        try:
            self._spawn(
                "munged",
                [
                    _which("munged"),
                    "--foreground",
                    "--force",  # tolerate /tmp-style parents (sticky, world-writable) of our private folders
                    f"--socket={self.munge_socket}",
                    f"--key-file={key}",
                    f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                    f"--log-file={self.logs['munged']}",
                    f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                ],
            )
            self._wait("the munge socket", self.munge_socket.exists, 20, daemon="munged")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait("slurmctld", lambda: self._run("scontrol", "ping").returncode == 0, timeout_s, "slurmctld")
            self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.hostname])
            self._wait("the node to become idle", lambda: self._node_state() == "idle", timeout_s, "slurmd")
        except BaseException:
            self.stop()
            raise
        self._old_slurm_conf = os.environ.get("SLURM_CONF")
        os.environ.update(self.env())
        _logger.info("SLURM test cluster up: SLURM_CONF=%s", self.conf)

    # --- teardown --------------------------------------------------------------------------------------------
    def cancel_all(self, timeout_s: float = 30) -> None:
        """Cancel every job of this cluster and wait until none is left running."""
        if "slurmctld" not in self._procs or self._procs["slurmctld"].poll() is not None:
            return
        self._run("scancel", "--user", "root")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            res = self._run("squeue", "-h", "-o", "%i")
            if res.returncode != 0 or not res.stdout.strip():
                return
            time.sleep(0.5)
        _logger.warning("jobs still running on the test cluster after %.0f s", timeout_s)

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons (slurmd, slurmctld, munged) and restore ``SLURM_CONF``."""
        try:
            self.cancel_all()
        except (OSError, subprocess.SubprocessError) as err:
            _logger.warning("could not cancel the test cluster's jobs: %s", err)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        if self._old_slurm_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._old_slurm_conf

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    cluster = SlurmCluster(sys.argv[1] if len(sys.argv) > 1 else "/tmp/vitssl-slurm")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the cluster like Ctrl-C
    with cluster:
        print(f"export SLURM_CONF={cluster.conf}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
