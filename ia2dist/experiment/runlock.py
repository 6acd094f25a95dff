"""One writer per run directory.

``ia2dist run``, ``extract``, ``train`` and ``eval`` hold ``RUN_DIR/.ia2dist.lock`` while they
write. The lock file says who holds it (host, pid, process start time, verb, since when) and its
modification time is a heartbeat, refreshed every ``HEARTBEAT_S`` seconds by a daemon thread.

A second process that finds the lock refuses at once with one line naming the holder, unless the
holder is provably gone:

- on the same host: its pid no longer runs, or runs a different process (another start time);
- on another host (a shared filesystem; a requeued SLURM job on a new node): its heartbeat is older
  than ``stale_after_s()`` (``IA2DIST_LOCK_STALE_S``, default 10 minutes), i.e. the holder's node
  stopped refreshing it (killed, node lost).

Taking a lock over is itself serialised by a short-lived ``.ia2dist.lock.takeover`` file created
with O_EXCL (atomic on local filesystems and NFSv3+), so two processes that both find a dead
holder cannot both win. Nothing here uses ``flock``/``fcntl`` locks: they are not reliable on every
shared filesystem a cluster mounts, and a lock that dies with its holder cannot name the holder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from ia2dist.errors import IA2Error

log = logging.getLogger("ia2dist")

LOCK_FILE = ".ia2dist.lock"
HEARTBEAT_S = 30.0


def stale_after_s() -> float:
    """Seconds without a heartbeat after which a lock held from another host counts as dead."""
    return float(os.environ.get("IA2DIST_LOCK_STALE_S", "600"))


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), to tell a reused pid from
    the holder; None where /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if started is None:
        return True
    now = _start_time(pid)
    return now is None or now == started


def describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return (f"{holder.get('verb', 'ia2dist')} (host {holder.get('host', '?')}, pid "
            f"{holder.get('pid', '?')}, since {since})")


def read_holder(run_dir: Path) -> dict | None:
    """The lock's holder record, or None when the directory is not locked."""
    try:
        return json.loads((run_dir / LOCK_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written right now, or garbage: judged by its age


def _age(path: Path) -> float:
    """Seconds since ``path`` was last written (its heartbeat); inf when it is gone."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def holder_is_alive(run_dir: Path, holder: dict) -> bool:
    """Whether the process that wrote ``holder`` may still be writing ``run_dir``."""
    age = _age(run_dir / LOCK_FILE)
    if age == float("inf"):
        return False
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return _alive(holder["pid"], holder.get("started"))
    return age < stale_after_s()


def check_unlocked(run_dir: Path) -> None:
    """Raise the one-line refusal when a live process holds ``run_dir``'s lock."""
    holder = read_holder(run_dir)
    if holder and holder_is_alive(run_dir, holder):
        raise IA2Error(_busy(run_dir, holder))


def _busy(run_dir: Path, holder: dict) -> str:
    return (f"run_dir: {run_dir} is being written by {describe(holder)}; wait for it to finish "
            f"or stop it first (the lock of a process that is gone is taken over automatically; "
            f"from another host after {stale_after_s():.0f} s without a heartbeat)")


class RunLock:
    """The lock of one run directory for this process (a context manager)."""

    def __init__(self, run_dir: Path, verb: str):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.verb = verb
        self.token = uuid.uuid4().hex
        self.created_dir = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _record(self) -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid),
                "verb": f"ia2dist {self.verb}", "since": time.time(), "token": self.token}

    def acquire(self) -> RunLock:
        """Take the lock (creating the run directory when absent) or raise IA2Error naming the
        live holder."""
        if not self.run_dir.exists():
            self.run_dir.mkdir(parents=True)
            os.chmod(self.run_dir, 0o700)
            self.created_dir = True
        for _ in range(20):
            if self._create():
                break
            holder = read_holder(self.run_dir)
            if holder is None:
                continue  # released between our two looks
            if holder == {} and _age(self.path) < 2.0:
                time.sleep(0.1)  # its writer is between creating and filling it
                continue
            if holder_is_alive(self.run_dir, holder):
                self._undo_dir()
                raise IA2Error(_busy(self.run_dir, holder))
            self._take_over(holder)
        else:
            self._undo_dir()
            raise IA2Error(f"run_dir: could not lock {self.run_dir} (its lock changed hands 20 "
                           "times); try again")
        self._thread = threading.Thread(target=self._heartbeat, name="ia2dist-run-lock",
                                        daemon=True)
        self._thread.start()
        return self

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(self._record(), fh)
        return True

    def _take_over(self, dead: dict) -> None:
        """Remove a dead holder's lock, unless someone else is doing the same right now."""
        mutex = self.path.with_name(LOCK_FILE + ".takeover")
        try:
            fd = os.open(mutex, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            try:  # a taker that died inside this window leaves its mutex behind
                if time.time() - mutex.stat().st_mtime > 60:
                    mutex.unlink()
            except FileNotFoundError:
                pass
            time.sleep(0.2)
            return
        os.close(fd)
        try:
            if read_holder(self.run_dir) == dead and not holder_is_alive(self.run_dir, dead):
                log.warning("run_dir %s: taking over the lock of %s, which is no longer running",
                            self.run_dir, describe(dead) if dead else "an unreadable lock")
                self.path.unlink(missing_ok=True)
        finally:
            mutex.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder = read_holder(self.run_dir)
            if not holder or holder.get("token") != self.token:
                self.lost = True
                log.error("run_dir %s: this process no longer holds its lock (now: %s); another "
                          "process took it over", self.run_dir,
                          describe(holder) if holder else "none")
                return
            try:
                os.utime(self.path)
            except OSError:
                pass

    def _undo_dir(self) -> None:
        if self.created_dir:
            try:
                self.run_dir.rmdir()
            except OSError:
                pass
            self.created_dir = False

    def release(self, remove_empty_dir: bool = False) -> None:
        """Give the lock back (only our own); with ``remove_empty_dir``, also remove a run
        directory this lock created and nothing else wrote into."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = read_holder(self.run_dir)
        if holder and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        if remove_empty_dir:
            self._undo_dir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
