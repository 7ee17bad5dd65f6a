"""The soak's hands: launch a torchrun job, find its workers, and inject one fault at a time.

A fault is a signal (SIGKILL or SIGTERM) sent to one worker or to the whole job, at a moment:
- "random time": a random delay after a new generation of workers (torchrun's restart, or the
  relaunch, after the previous fault) made progress: a step logged, a shard written;
- "start-up": a random delay after a new generation of workers appeared, before it trained;
- a fault point of kd/fault_points.py ("inside checkpoint.model_written", ...): the point is armed,
  the first process to reach it holds there, and the victim is that process or its peer.
After a whole-job fault the same command is launched again, as a user (or a scheduler) would.
"""
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from kd.fault_points import ENV as POINTS_ENV
from kd.fault_points import held_name

POLL_S = 0.02


def child_pids(pid: int) -> List[int]:
    """Direct children of a process: torchrun's workers, when pid is the torchrun agent."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(c) for c in fh.read().split()]
    except OSError:
        return []


def rank_of(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
        return int(env[b"RANK"])
    except (OSError, KeyError, ValueError):
        return None


def signal_pid(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # it died on its own (its peer's death brought it down first)


@dataclass
class FaultSpec:
    signal: str   # SIGKILL | SIGTERM
    target: str   # worker | job
    moment: str   # random time | start-up | a fault point name


@dataclass
class Fault:
    spec: FaultSpec
    moment: str          # what the moment turned out to be (a start-up kill can land after the first step)
    victim: str          # "rank 1", "rank 0 (held)", "job"
    progress: int        # the run's progress counter when it struck
    survived: bool = False


@dataclass
class Job:
    """One torchrun launch of the soaked run."""
    command: List[str]
    env: dict
    log_path: str
    proc: subprocess.Popen = None
    seen: set = field(default_factory=set)   # worker pids already seen, to tell generations apart

    def start(self) -> None:
        with open(self.log_path, "a") as log:
            log.write(f"\n$ {' '.join(self.command)}\n")
            log.flush()
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.seen = set()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def workers(self) -> dict:
        """rank -> pid of the current workers (those whose rank could be read)."""
        pids = child_pids(self.proc.pid)
        ranks = {rank_of(pid): pid for pid in pids}
        return {r: p for r, p in ranks.items() if r is not None}

    def kill_all(self) -> None:
        workers = list(self.workers().values())
        signal_pid(self.proc.pid, signal.SIGKILL)
        for pid in workers:
            signal_pid(pid, signal.SIGKILL)
        self.proc.wait()
        for pid in workers:  # not our children: wait until they are gone, so the next launch is alone
            while os.path.exists(f"/proc/{pid}") and _state(pid) not in ("Z", None):
                time.sleep(POLL_S)


def _state(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class Stuck(Exception):
    """The run neither progressed nor ended in time: a hang, reported as a fault not survived."""


def wait_for(condition: Callable[[], bool], job: Job, timeout: float, what: str) -> bool:
    """True once condition() holds; False if the job ended first; Stuck after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if not job.running():
            return condition()
        time.sleep(POLL_S)
    raise Stuck(f"no {what} within {timeout:.0f} s")


class Injector:
    """Injects faults into one soaked run and relaunches it after whole-job faults."""

    def __init__(self, job: Job, progress: Callable[[], int], points_dir: str, rng: random.Random,
                 window_s: float, startup_window_s: float, timeout_s: float):
        self.job, self.progress, self.points_dir, self.rng = job, progress, points_dir, rng
        self.window_s, self.startup_window_s, self.timeout_s = window_s, startup_window_s, timeout_s
        self.relaunches = 0
        self.expect_exit = False  # True after a whole-job fault, until the run is launched again

    def ensure_running(self) -> bool:
        """Relaunch after a whole-job fault; False once the run has finished. An exit nobody asked
        for (torchrun out of restarts, an error) raises RuntimeError: that fault was not survived."""
        if self.job.running():
            return True
        if self.job.proc is not None:
            code = self.job.proc.returncode
            if code == 0:
                return False
            if not self.expect_exit:
                raise RuntimeError(f"the run stopped by itself with exit status {code} (see {self.job.log_path})")
            self.relaunches += 1
        self.expect_exit = False
        self.job.start()
        return True

    def _new_generation(self) -> dict:
        workers = {}

        def appeared():
            nonlocal workers
            workers = self.job.workers()
            return len(workers) >= 2 and not set(workers.values()) & self.job.seen
        wait_for(appeared, self.job, self.timeout_s, "new generation of workers")
        return workers

    def inject(self, spec: FaultSpec) -> Optional[Fault]:
        """One fault; None if the run finished before it could strike. It waits for a generation of
        workers that the previous fault did not strike, and unless it is aimed at their start-up, for
        that generation's progress (a step logged, a shard written): the previous fault survived."""
        if not self.ensure_running():
            return None
        workers = self._new_generation()
        if not self.job.running():
            return None
        before = self.progress()
        if spec.moment == "start-up":
            time.sleep(self.rng.uniform(0.1, self.startup_window_s))
            moment = "start-up" if self.progress() == before else "random time"
            return self._strike(spec, moment, workers)
        if not wait_for(lambda: self.progress() > before, self.job, self.timeout_s, "progress"):
            return None
        if spec.moment == "random time":
            time.sleep(self.rng.uniform(0.0, self.window_s))
            return self._strike(spec, "random time", self.job.workers())
        return self._strike_at_point(spec)

    def _strike_at_point(self, spec: FaultSpec) -> Optional[Fault]:
        armed = os.path.join(self.points_dir, f"armed.{spec.moment}")
        open(armed, "w").close()
        prefix = held_name(spec.moment, "")
        held = []

        def taken():
            held[:] = [n for n in os.listdir(self.points_dir) if n.startswith(prefix)]
            return bool(held)
        try:
            if not wait_for(taken, self.job, self.timeout_s, f"process at {spec.moment}"):
                return None
        finally:
            if os.path.exists(armed):
                os.remove(armed)
        held_pid = int(held[0].rsplit(".", 1)[1])
        workers = self.job.workers()
        held_rank = next((r for r, p in workers.items() if p == held_pid), None)
        peers = [r for r in workers if r != held_rank]
        if spec.target == "worker" and peers and self.rng.random() < 0.5:
            fault = self._strike(spec, f"inside {spec.moment}", workers, rank=self.rng.choice(peers),
                                 note=f"peer of the held rank {held_rank}")
        else:
            fault = self._strike(spec, f"inside {spec.moment}", workers, rank=held_rank, note="held")
        os.remove(os.path.join(self.points_dir, held[0]))  # release the held process if it still lives
        return fault

    def _strike(self, spec: FaultSpec, moment: str, workers: dict, rank: Optional[int] = None,
                note: str = "") -> Optional[Fault]:
        if not self.job.running():
            return None
        self.job.seen |= set(workers.values())
        progress = self.progress()
        signum = getattr(signal, spec.signal)
        if spec.target == "job":
            if signum == signal.SIGKILL:
                self.job.kill_all()
            else:  # the agent passes SIGTERM on to the workers, which save and stop; then it exits
                signal_pid(self.job.proc.pid, signum)
                self.job.proc.wait(timeout=self.timeout_s)
            victim = "job"
            self.expect_exit = True
        else:
            if rank is None or rank not in workers:
                rank = self.rng.choice(sorted(workers)) if workers else None
            if rank is None:
                return None
            signal_pid(workers[rank], signum)
            victim = f"rank {rank}" + (f" ({note})" if note else "")
        return Fault(spec, moment, victim, progress)


def soak_env(points_dir: Optional[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop(POINTS_ENV, None)
    if points_dir is not None:
        os.makedirs(points_dir, exist_ok=True)
        env[POINTS_ENV] = points_dir
    return env
