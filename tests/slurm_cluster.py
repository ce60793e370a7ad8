"""A real one-node Slurm cluster on localhost for the tests: munged, slurmctld and slurmd, each
started here with its own configuration, sockets, ports, state and logs in one temporary folder,
and stopped again afterwards. Nothing is written to /etc and no system service is touched.

The node is `localhost` with 2 CPUs and no GPUs, in one partition `emoe`. There is no accounting
database, so job states are read with `scontrol show job` (finished jobs stay listed for an hour).

When Slurm or munge is not installed, the fixture installs Debian's packages (`slurm-wlm`,
`munge`) with apt-get if it runs as root. If that or the start fails, the tests using the cluster
are skipped with the reason, except under CI (the environment variable CI set and not "false"),
where they fail: CI must really run them.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

NODE = "localhost"
PARTITION = "emoe"
CPUS = 2
# A requeued job may start again only after the job step credentials' lifetime (Slurm's default
# 120 s + 1): short here, so that a requeue test does not wait two minutes (Slurm ignores values
# below 5 and keeps 120).
CRED_EXPIRE_S = 5
PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name, path=_sbin_path()) is None]


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])


def install() -> None:
    """Install Slurm and munge from the distribution when a command is missing (root + apt only)."""
    missing = _missing()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed, and no root apt-get to install "
                               f"{' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(command)} failed: {(proc.stderr or proc.stdout)[-2000:]}")
    if _missing():
        raise SlurmUnavailable(f"still missing after apt-get install: {', '.join(_missing())}")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SlurmCluster:
    """munged + slurmctld + slurmd on localhost, configured in `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), PATH=_sbin_path())

    # -- setup ----------------------------------------------------------------------------------
    def write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            (self.root / sub).chmod(0o700)
        controller = socket.gethostname().split(".")[0]
        ctld_port, slurmd_port = _free_ports(2)
        # The scripts' rendezvous port is 20000 + job id: job ids from a random start keep two
        # test clusters on one machine (two sessions) apart.
        first_job_id = random.randrange(1000, 19000)
        r = self.root
        self.conf.write_text(f"""\
# megatron-emoe test cluster (tests/slurm_cluster.py)
ClusterName=emoetest
FirstJobId={first_job_id}
# GPUs are a known resource type, of which the node has none: the scripts' `--gpus-per-node=8`
# is refused, `sbatch --gpus-per-node=0` overrides it.
GresTypes=gpu
SlurmctldHost={controller}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MinJobAge=3600
KillWait=30
InactiveLimit=0
MessageTimeout=20
SlurmdTimeout=300
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={CPUS} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")

    def _start(self, name: str, command: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.processes[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        log.close()

    def _wait_for(self, what: str, ready, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with status {proc.returncode} while waiting for "
                                           f"{what}: {self.daemon_log(name)[-2000:]}")
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"timed out waiting for {what}: {self.daemon_log()[-3000:]}")
            time.sleep(0.2)

    def start(self) -> None:
        self.write_config()
        key = self.root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], env=self.env, check=True,
                       capture_output=True, timeout=60)
        key.chmod(0o600)
        self._start("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.root}/munge/munged.pid",
                               f"--log-file={self.root}/log/munged.log",
                               f"--seed-file={self.root}/munge/munged.seed"])
        self._wait_for("munged's socket", self.munge_socket.exists)
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait_for("slurmctld", lambda: self.scontrol("ping").returncode == 0)
        self._start("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", NODE])
        self._wait_for(f"node {NODE} to be idle", lambda: "idle" in self.run(
            ["sinfo", "-h", "-n", NODE, "-o", "%t"]).stdout)

    def stop(self) -> None:
        """Cancel every job, wait for them to end, then stop slurmd, slurmctld and munged."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--partition", PARTITION])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.run(["squeue", "-h", "-t", "R,CG,S"]).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.processes.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)

    # -- use ------------------------------------------------------------------------------------
    def run(self, command: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env if env is None else {**env, "SLURM_CONF": str(self.conf)},
                              capture_output=True, text=True, timeout=kwargs.pop("timeout", 60), **kwargs)

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(["scontrol", *args])

    def sbatch(self, script: Path | str, *args: str, sbatch_args: tuple[str, ...] = (),
               env: dict[str, str] | None = None, cwd: Path | str | None = None) -> int:
        """Submit `script args...` with `sbatch sbatch_args...`; the job id."""
        proc = self.run(["sbatch", "--parsable", *sbatch_args, str(script), *args], env=env, cwd=cwd)
        assert proc.returncode == 0, f"sbatch failed ({proc.returncode}): {proc.stderr}"
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        proc = self.scontrol("show", "job", "--oneliner", str(job_id))
        assert proc.returncode == 0, proc.stderr
        fields = {}
        for word in proc.stdout.split():
            key, sep, value = word.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait(self, job_id: int, timeout: float = 300, states=FINISHED) -> dict[str, str]:
        """Wait until the job is in one of `states` (default: finished); its `job` fields."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            assert time.monotonic() < deadline, f"job {job_id} still {info.get('JobState')} after {timeout}s"
            time.sleep(0.2)

    def daemon_log(self, name: str | None = None) -> str:
        names = [name] if name else ["munged", "slurmctld", "slurmd"]
        out = []
        for n in names:
            for path in (self.root / "log" / f"{n}.log", self.root / "log" / f"{n}.out"):
                if path.exists():
                    out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)


def start_cluster(root: Path) -> SlurmCluster:
    """Install if needed and start a cluster in `root`; SlurmUnavailable on any failure."""
    install()
    cluster = SlurmCluster(root)
    atexit.register(cluster.stop)  # also if the session ends without the fixture's teardown
    try:
        cluster.start()
    except BaseException as error:
        cluster.stop()
        if isinstance(error, (OSError, subprocess.SubprocessError)):
            raise SlurmUnavailable(f"cannot start Slurm: {error}") from error
        raise
    return cluster


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running one-node cluster (`SlurmCluster`), stopped at the end of the module."""
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as error:
        if in_ci():
            pytest.fail(f"CI needs a real Slurm for the Slurm tests: {error}")
        pytest.skip(f"no real Slurm here: {error}")
    try:
        yield cluster
    finally:
        cluster.stop()
