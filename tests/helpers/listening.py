"""Who listens where: the TCP listening sockets of the processes of one cluster, read from the
kernel's socket tables, and what an HTTP request without credentials gets from each of them.

A cluster's processes are those whose environment matches (the test's private HOME, a SLURM job id)
and all their descendants (Ray renames its workers and agents, which hides their environment).
Sockets are attributed through the socket inodes in /proc/<pid>/fd matched against /proc/net/tcp
and /proc/net/tcp6. Probes only ever connect to loopback addresses.

The exceptions a test allows are the ones docs/security.md documents; ``check`` takes them as
arguments so that each test states its own.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

WILDCARDS = {"0.0.0.0", "::"}
_TCP_LISTEN = "0A"
#: (marker in the command line, role); Ray's Python workers are renamed ray::<actor or task>
_ROLES = (("core/src/ray/gcs/gcs_server", "gcs_server"), ("core/src/ray/raylet/raylet", "raylet"),
          ("ray/dashboard/dashboard.py", "dashboard"), ("ray/dashboard/agent.py", "DashboardAgent"),
          ("ray::DashboardAgent", "DashboardAgent"), ("runtime_env/agent/main.py",
                                                      "RuntimeEnvAgent"),
          ("ray::RuntimeEnvAgent", "RuntimeEnvAgent"), ("ray.util.client.server", "client_server"),
          ("autoscaler/_private/monitor.py", "monitor"), ("autoscaler/v2/monitor.py", "monitor"),
          ("_private/log_monitor.py", "log_monitor"))


@dataclass(frozen=True)
class Listener:
    pid: int
    role: str  # gcs_server, raylet, dashboard, DashboardAgent, ..., ray::<worker>, or "driver"
    ip: str  # as bound; IPv4-mapped IPv6 addresses as IPv4
    port: int

    @property
    def where(self) -> str:
        return f"{self.role} (pid {self.pid}) on {self.ip}:{self.port}"


@dataclass(frozen=True)
class Probe:
    outcome: str  # refused | closed | non-http | http
    status: int | None = None
    body: bytes = b""

    def __str__(self) -> str:
        if self.outcome != "http":
            return self.outcome
        return f"HTTP {self.status} {self.body[:100]!r}"


def _hex_ip(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) byte order
    address = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return str(address.ipv4_mapped) if address.ipv4_mapped else str(address)


def _listening_inodes() -> dict[int, tuple[str, int]]:
    table = {}
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if path.exists():
            for line in path.read_text().splitlines()[1:]:
                parts = line.split()
                if parts[3] == _TCP_LISTEN:
                    ip, port = parts[1].split(":")
                    table[int(parts[9])] = (_hex_ip(ip), int(port, 16))
    return table


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def _environ(pid: int) -> dict[str, str]:
    out = {}
    for item in _read(f"/proc/{pid}/environ").split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def role(pid: int) -> str:
    """What a cluster process is, from its command line."""
    cmd = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
    for marker, name in _ROLES:
        if marker in cmd[:400]:
            return name
    if cmd.startswith("ray::"):
        return cmd.split()[0].split(".")[0]  # ray::RayTrainWorker, ray::TeacherActor, ray::IDLE
    return "driver"  # drivers and the scripts that started the cluster


def processes(env_match: dict[str, str], cache: dict | None = None) -> set[int]:
    """Pids of the processes whose environment has every key/value of ``env_match``, and of all
    their descendants. ``cache`` remembers which processes (pid and start time) matched, and the
    command line of those that did not (a miss is read again once the process has exec'd)."""
    parents, started = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _read(f"/proc/{entry.name}/stat").decode(errors="replace")
            if stat:
                fields = stat.rsplit(")", 1)[1].split()
                parents[int(entry.name)], started[int(entry.name)] = int(fields[1]), fields[19]
    me = os.getpid()
    cache = {} if cache is None else cache
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)

    def matches(pid: int) -> bool:
        # A match is for the process's life. A miss holds only while its command line stays the
        # same: between fork and exec a child still shows its parent's environment (a test's
        # Popen of `ia2dist ...` with a private HOME looks like pytest itself for a moment).
        key = (pid, started[pid])
        known = cache.get(key)
        if known is True:
            return True
        cmd = _read(f"/proc/{pid}/cmdline")
        if known != cmd:  # never seen, or exec'd since the miss
            env = _environ(pid)
            cache[key] = True if all(env.get(k) == v for k, v in env_match.items()) else cmd
        return cache[key] is True

    todo = [pid for pid in parents if pid != me and matches(pid)]
    found: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def listeners(pids: set[int]) -> list[Listener]:
    """The TCP sockets in LISTEN state held by ``pids``."""
    table = _listening_inodes()
    found = []
    for pid in sorted(pids):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        inodes = set()
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
        mine = sorted(inodes & table.keys())
        if mine:
            kind = role(pid)
            found.extend(Listener(pid, kind, *table[inode]) for inode in mine)
    return found


def probe_http(port: int, host: str = "127.0.0.1", timeout_s: float = 3.0) -> Probe:
    """``GET /`` over HTTP/1.1 without credentials; what came back."""
    assert ipaddress.ip_address(host).is_loopback, "tests connect to loopback addresses only"
    try:
        conn = socket.create_connection((host, port), timeout=timeout_s)
    except OSError:
        return Probe("refused")
    data = b""
    with conn:
        try:
            conn.sendall(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
                         .encode())
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and len(data) < 1 << 20:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
    if not data:
        return Probe("closed")
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if not data.startswith(b"HTTP/") or len(parts) < 2 or not parts[1].isdigit():
        return Probe("non-http", body=data[:64])
    return Probe("http", int(parts[1]), body)


def probe_host(listener: Listener) -> str | None:
    """The loopback address ``listener`` can be probed on (None: not reachable over loopback)."""
    if listener.ip in WILDCARDS:
        return "127.0.0.1"
    return listener.ip if ipaddress.ip_address(listener.ip).is_loopback else None


@dataclass
class Watcher:
    """Samples the listening sockets of the processes matching ``env_match`` every
    ``interval_s`` in a thread (clusters open ports as workers and drivers come and go) and probes
    each new one once, over HTTP without credentials, while it is open. Probes run in a pool of
    their own: a port that holds a probe for its whole timeout never delays the next sample, so a
    short-lived listener (a driver connected for a few seconds) is still seen."""

    env_match: dict[str, str]
    interval_s: float = 1.0
    seen: dict[tuple[int, str, int], Listener] = field(default_factory=dict)
    probes: dict[tuple[int, str, int], Probe] = field(default_factory=dict)
    roles: dict[int, set[str]] = field(default_factory=dict)  # every role a process was seen in
    samples: int = 0
    _matched: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="probe")
        self._pending: list[Future] = []

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def _probe(self, key: tuple[int, str, int], port: int, host: str) -> None:
        outcome = probe_http(port, host)
        with self._lock:
            self.probes[key] = outcome

    def sample(self, wait_probes: bool = True) -> None:
        """One sample; its probes run in the pool (the watcher's own thread does not wait for
        them, a direct call does, so that what it saw is probed before the caller goes on)."""
        found = listeners(processes(self.env_match, self._matched))
        submitted = []
        with self._lock:
            for item in found:
                self.roles.setdefault(item.pid, set()).add(item.role)
                key = (item.pid, item.ip, item.port)
                if key not in self.seen:
                    self.seen[key] = item
                    host = probe_host(item)
                    if host is not None:
                        submitted.append(self._pool.submit(self._probe, key, item.port, host))
            self._pending.extend(submitted)
            self.samples += 1
        if wait_probes:
            wait(submitted, timeout=60)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample(wait_probes=False)
            self._stop.wait(self.interval_s)

    def stop(self) -> Watcher:
        self._stop.set()
        self._thread.join(timeout=60)
        wait(self._pending, timeout=60)
        self._pool.shutdown(wait=False, cancel_futures=True)
        return self

    def report(self) -> str:
        return "\n".join([f"  ({self.samples} samples)"] + [
            f"  {item.where}: {self.probes.get(key, 'not probed')}"
            for key, item in sorted(self.seen.items())])

    def check(self, chosen: str, *, wildcard: dict[str, int] | None = None,
              loopback: bool = False, data: dict[tuple[str, int | None], bytes] | None = None
              ) -> list[str]:
        """What breaks the rules: a listener on an address other than ``chosen``, except
        ``wildcard`` (role -> most wildcard sockets one process of that role may hold; a role
        ending in "*" matches by prefix; the first match counts) and, with ``loopback``, loopback
        addresses (no other machine reaches them); and an HTTP answer other than refused /
        closed / non-HTTP / 401 / 403, except ``data``: (role, port or None for any) -> the
        documented start of the body. A process counts with every role it was seen in (Ray
        renames a worker with each task it runs)."""
        wildcard, data = wildcard or {}, data or {}
        problems, per_process = [], {}

        def allowed(pid: int) -> int:
            best = 0
            for kind in self.roles.get(pid, ()):
                for name, count in wildcard.items():
                    if kind == name or (name.endswith("*") and kind.startswith(name[:-1])):
                        best = max(best, count)
                        break
            return best

        for key, item in sorted(self.seen.items()):
            ip = ipaddress.ip_address(item.ip)
            if item.ip in WILDCARDS:
                per_process[item.pid] = per_process.get(item.pid, 0) + 1
                if per_process[item.pid] > allowed(item.pid):
                    problems.append(f"{item.where}: every interface")
            elif item.ip != chosen and not (loopback and ip.is_loopback):
                problems.append(f"{item.where}: not {chosen}")
            probe = self.probes.get(key)
            if probe is None or probe.outcome != "http" or probe.status in (401, 403):
                continue
            documented = [prefix for (kind, port), prefix in data.items()
                          if kind in self.roles.get(item.pid, {item.role})
                          and port in (None, item.port)]
            if not any(probe.status == 200 and probe.body.lstrip().startswith(prefix)
                       for prefix in documented):
                problems.append(f"{item.where}: answers without the token: {probe}")
        return problems
