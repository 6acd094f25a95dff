"""Connecting to a Ray cluster, checking it can hold a stage, and shutting it down.

``connect(None)`` / ``connect("local")`` starts an embedded single-node Ray with its own temp dir
(object spilling goes under it); ``connect("auto")`` / ``connect("host:port")`` joins a running
cluster. Ray itself waits a minute or more on an unreachable GCS address, so the address is first
probed with a plain TCP connect and then a GCS handshake in a child process, each bounded by
``timeout_s``: a wrong address fails in seconds with one line naming it and the fix.

``check_resources`` compares what a stage will ask for with what the cluster has, so that a request
no node can satisfy fails at once instead of leaving actors pending forever.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from ia2dist.errors import IA2Error

log = logging.getLogger(__name__)

#: glibc keeps freed large blocks in the heap once its dynamic mmap threshold has grown, so the
#: transient full-size tensors of a partitioned load (and of every ZeRO-3 gather) would stay in a
#: worker's RSS; a fixed threshold returns them to the OS (measured: a 2-rank load's peak 0.85x ->
#: 0.57x the model's bytes). Workers of a private local Ray get it through the job's runtime
#: environment; the SLURM launchers and ray_jobs/ set it for the nodes they start.
MALLOC_MMAP_THRESHOLD = "65536"

#: Ray refuses object stores smaller than this.
MIN_OBJECT_STORE_BYTES = 75 * 1024 * 1024
#: Unix socket paths (temp_dir/session_<timestamp>/sockets/plasma_store) must stay under 108 bytes.
_MAX_TEMP_DIR_CHARS = 48
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
#: The only address a local Ray started by ``connect`` listens on.
LOCAL_ADDRESS = "127.0.0.1"
#: Environment switch of Ray's metrics export (Prometheus endpoints): off unless "1".
METRICS_ENV = "IA2_RAY_METRICS"


def ray_metrics_enabled() -> bool:
    """True when IA2_RAY_METRICS=1 asks for Ray's metrics export; unset or 0: off."""
    value = os.environ.get(METRICS_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise IA2Error(f"{METRICS_ENV}={value!r}: use 1 to export Ray's metrics (Prometheus, on "
                       f"the cluster's own address) or 0 / unset to keep them off")
    return value == "1"


@dataclass
class RayContext:
    """A connection made by ``connect``. ``owns_cluster``: True when this process started Ray
    (``shutdown`` then stops the whole local cluster), False when it joined one."""

    address: str
    owns_cluster: bool
    temp_dir: str | None = None
    spill_dir: str | None = None
    object_store_bytes: int | None = None
    remove_temp_dir: bool = False
    """The temp dir was made for this cluster (``connect`` without ``temp_dir``): ``shutdown``
    deletes it unless asked to keep it (its session logs, for a failed run)."""
    _closed: bool = field(default=False, repr=False)

    def resources(self) -> dict[str, float]:
        """Total resources of the cluster (CPU, GPU, memory, object_store_memory, ...)."""
        return dict(ray.cluster_resources())

    def shutdown(self, keep_temp_dir: bool = False) -> None:
        """Disconnect; a cluster this process started is stopped, and its temp dir deleted when
        ``connect`` made it, unless ``keep_temp_dir`` (then its path is logged)."""
        if self._closed:
            return
        self._closed = True
        ray.shutdown()
        if not (self.owns_cluster and self.remove_temp_dir and self.temp_dir):
            return
        if keep_temp_dir:
            log.info("Ray session logs kept in %s", self.temp_dir)
            return
        _remove_tree(self.temp_dir)

    def __enter__(self) -> RayContext:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _worker_env() -> dict:
    """The runtime environment of this job's Ray workers (see ``MALLOC_MMAP_THRESHOLD``)."""
    return {"env_vars": {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_",
                                                                  MALLOC_MMAP_THRESHOLD)}}


def _default_temp_dir() -> str:
    return tempfile.mkdtemp(prefix="ray_", dir="/tmp")


def _remove_tree(path: str, attempts: int = 10) -> None:
    """Delete ``path``; Ray processes that are still exiting may write into it for a moment after
    shutdown, so it is retried for a few seconds, then left with a warning."""
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(0.3)
        if not os.path.exists(path):
            return
    log.warning("could not delete the Ray temp dir %s; remove it by hand", path)


def _start_local(num_cpus: int | None, num_gpus: int | None, object_store_bytes: int | None,
                 temp_dir: str | None, log_to_driver: bool) -> RayContext:
    if object_store_bytes is not None and object_store_bytes < MIN_OBJECT_STORE_BYTES:
        raise IA2Error(f"ray object_store_bytes: {object_store_bytes} is below Ray's minimum of "
                       f"{MIN_OBJECT_STORE_BYTES} (75 MiB); give at least that")
    made = not temp_dir
    temp_dir = os.path.abspath(temp_dir) if temp_dir else _default_temp_dir()
    if len(temp_dir) > _MAX_TEMP_DIR_CHARS:
        raise IA2Error(f"ray temp_dir: {temp_dir} is {len(temp_dir)} characters; Ray's unix "
                       f"sockets need a short path, use one of at most {_MAX_TEMP_DIR_CHARS} "
                       f"characters such as /tmp/ray_<name>")
    spill_dir = os.path.join(temp_dir, "spill")
    Path(spill_dir).mkdir(parents=True, exist_ok=True)
    metrics = ray_metrics_enabled()
    try:
        # every port on LOCAL_ADDRESS (see ia2dist.backends.ray.auth.private_ray_local_only); no dashboard;
        # no metrics export unless asked for (the dashboard agent's Prometheus endpoint)
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                 object_store_memory=object_store_bytes, _temp_dir=temp_dir,
                 object_spilling_directory=spill_dir, include_dashboard=False,
                 _node_ip_address=LOCAL_ADDRESS,
                 _system_config={"enable_metrics_collection": metrics},
                 log_to_driver=log_to_driver, configure_logging=False,
                 runtime_env=_worker_env())
    except BaseException:
        if made:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    address = ray.get_runtime_context().gcs_address
    if not address.startswith(f"{LOCAL_ADDRESS}:"):
        log.warning("the local Ray listens on %s, not only on %s: Ray was imported before "
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 could be set (the ia2dist command sets "
                    "it); its ports are token-protected but reachable from the network",
                    address.rsplit(":", 1)[0], LOCAL_ADDRESS)
    log.info("started a local Ray at %s (temp dir %s)", address, temp_dir)
    return RayContext(address=address, owns_cluster=True, temp_dir=temp_dir, spill_dir=spill_dir,
                      object_store_bytes=object_store_bytes, remove_temp_dir=made)


#: The documented way back to a private local Ray, named by every unreachable-cluster error.
_LOCAL = "remove dist.ray_address (null starts a private local Ray)"


def _resolve_address(address: str) -> str:
    """'auto' -> the address of the running cluster Ray would join; 'host:port' unchanged."""
    from ray._private import services

    try:
        resolved = services.canonicalize_bootstrap_address(address)
    except ValueError:
        raise IA2Error(f"ray address {address!r}: expected host:port (e.g. 10.0.0.1:6379) "
                       f"or 'auto'") from None
    except ConnectionError as exc:
        raise IA2Error(f"ray address {address!r}: {' '.join(str(exc).split())}; start a cluster "
                       f"with `ray start --head`, set RAY_ADDRESS, or {_LOCAL}") from None
    if resolved is None:
        raise IA2Error(f"ray address {address!r}: no running Ray cluster found; start one with "
                       f"`ray start --head`, set RAY_ADDRESS=host:port, or {_LOCAL}")
    return resolved


def _probe(address: str, original: str, timeout_s: float) -> None:
    """Fail fast when nothing listens at ``address`` (Ray itself would retry for minutes)."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise IA2Error(f"ray address {original!r}: expected host:port (e.g. 10.0.0.1:6379) "
                       f"or 'auto'")
    where = f"ray address {original!r}" + (f" (-> {hostport})" if hostport != original else "")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise IA2Error(f"{where}: cannot reach a Ray head at {hostport} "
                       f"({type(exc).__name__}: {exc}) within {timeout_s:g} s; check that "
                       f"`ray start --head` runs there and the port is open, or "
                       f"{_LOCAL}") from None


#: Asks the GCS at argv[1] for its cluster id (run in a child process: Ray's client retries for
#: a minute or more against something that accepts connections but is not a Ray head).
_GCS_HANDSHAKE = ("import sys; from ray._raylet import GcsClient; "
                  "print(GcsClient(address=sys.argv[1]).cluster_id.hex())")


def _handshake(address: str, original: str, timeout_s: float) -> None:
    """Fail fast when ``address`` accepts connections but does not answer as a Ray GCS."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    where = f"ray address {original!r}" + (f" (-> {address})" if address != original else "")
    try:
        done = subprocess.run([sys.executable, "-c", _GCS_HANDSHAKE, address], env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise IA2Error(f"{where}: no answer from a Ray head within {timeout_s:g} s; check the "
                       f"address and that `ray start --head` runs there, or {_LOCAL}"
                       ) from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise IA2Error(f"{where}: not a Ray head ({last}); check the host and port (the GCS port, "
                       f"6379 by default) and that `ray start --head` runs there, or {_LOCAL}")


def _join(address: str, timeout_s: float, log_to_driver: bool) -> RayContext:
    resolved = address if address.startswith("ray://") else _resolve_address(address)
    _probe(resolved, address, timeout_s)
    if not address.startswith("ray://"):
        _handshake(resolved, address, max(timeout_s, 5.0))
    _check_not_initialised()
    try:
        ray.init(address=resolved, log_to_driver=log_to_driver, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise IA2Error(f"ray address {address!r}: could not join the cluster at {resolved} "
                       f"({first}); check the address and that the Ray versions match") from None
    log.info("joined the Ray cluster at %s", resolved)
    return RayContext(address=resolved, owns_cluster=False)


def connect(address: str | None = None, *, num_cpus: int | None = None,
            num_gpus: int | None = None, object_store_bytes: int | None = None,
            temp_dir: str | None = None, timeout_s: float = 10.0,
            log_to_driver: bool = False) -> RayContext:
    """Start or join a Ray cluster and return its context.

    address: None or 'local' starts an embedded Ray on this machine with ``num_cpus``/``num_gpus``
        (None: detected), an object store of ``object_store_bytes`` (None: Ray's default, >= 75 MiB)
        and its own ``temp_dir`` (None: a fresh /tmp/ray_XXXX; objects beyond the store spill to
        ``temp_dir/spill``). 'auto' joins the cluster found from RAY_ADDRESS or the last
        ``ray start``; 'host:port' (or 'ray://host:port') joins that head. The resource arguments
        only apply to a local start. Raises IA2Error (one line) when the address is unreachable
        within ``timeout_s`` or Ray is already initialised in this process. ``log_to_driver``
        streams the actors' output to this process (it is always in ``temp_dir``'s session logs).
    """
    if address is None or address == "local":
        _check_not_initialised()
        return _start_local(num_cpus, num_gpus, object_store_bytes, temp_dir, log_to_driver)
    return _join(address, timeout_s, log_to_driver)


def _check_not_initialised() -> None:
    if ray.is_initialized():
        raise IA2Error("ray: already initialised in this process; call shutdown() on the existing "
                       "context first, or reuse it")


def shutdown(context: RayContext | None = None) -> None:
    """Disconnect (and stop the local cluster when this process started it)."""
    if context is not None:
        context.shutdown()
    elif ray.is_initialized():
        ray.shutdown()


# --------------------------------------------------------------------------------------------------
# Resource checks
# --------------------------------------------------------------------------------------------------

def _alive_nodes() -> list[dict[str, float]]:
    return [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]


def _fits(need: dict[str, float], have: dict[str, float]) -> bool:
    return all(have.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if v > 0)


def _describe(nodes: list[dict[str, float]]) -> str:
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    return f"{len(nodes)} node(s) with {cpus:g} CPU and {gpus:g} GPU in total"


def check_resources(num_actors: int, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                    num_workers: int = 0, cpus_per_worker: float = 1.0,
                    gpus_per_worker: float = 0.0, *, strategy: str = "PACK",
                    what: str = "teacher") -> None:
    """Raise IA2Error unless the cluster can hold ``num_actors`` teacher actors (one placement-group
    bundle each, placed with ``strategy``) plus ``num_workers`` other workers at the same time.

    Checks the totals, that one bundle fits on some node, that STRICT_SPREAD has a node per actor
    and that STRICT_PACK fits on one node. Capacity is the cluster's total, not what is free now.
    """
    if strategy not in STRATEGIES:
        raise IA2Error(f"{what} placement strategy {strategy!r}: use one of "
                       f"{', '.join(STRATEGIES)}")
    for name, value in (("num_actors", num_actors), ("cpus_per_actor", cpus_per_actor),
                        ("gpus_per_actor", gpus_per_actor), ("num_workers", num_workers),
                        ("cpus_per_worker", cpus_per_worker), ("gpus_per_worker", gpus_per_worker)):
        if value < 0:
            raise IA2Error(f"{what} {name}: must be >= 0, got {value}")
    if gpus_per_actor > 1 and gpus_per_actor != int(gpus_per_actor):
        raise IA2Error(f"{what} gpus_per_actor: {gpus_per_actor} GPUs; fractions are allowed only "
                       f"below 1, use a whole number above it")
    nodes = _alive_nodes()
    have = _describe(nodes)
    need_cpu = num_actors * cpus_per_actor + num_workers * cpus_per_worker
    need_gpu = num_actors * gpus_per_actor + num_workers * gpus_per_worker
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    breakdown = (f"{num_actors} {what} actor(s) x ({cpus_per_actor:g} CPU, {gpus_per_actor:g} GPU)"
                 + (f" + {num_workers} worker(s) x ({cpus_per_worker:g} CPU, "
                    f"{gpus_per_worker:g} GPU)" if num_workers else ""))
    fix = "use fewer actors/workers or fewer CPUs/GPUs each, or add nodes"
    if need_cpu > total_cpu + 1e-9:
        raise IA2Error(f"ray resources: {breakdown} need {need_cpu:g} CPU but the cluster has "
                       f"{have}; {fix}")
    if need_gpu > total_gpu + 1e-9:
        raise IA2Error(f"ray resources: {breakdown} need {need_gpu:g} GPU but the cluster has "
                       f"{have}; {fix}")
    bundle = {"CPU": cpus_per_actor, "GPU": gpus_per_actor}
    if num_actors and not any(_fits(bundle, n) for n in nodes):
        raise IA2Error(f"ray resources: one {what} actor needs {cpus_per_actor:g} CPU and "
                       f"{gpus_per_actor:g} GPU on a single node but no node has that ({have}); "
                       f"{fix}")
    if strategy == "STRICT_SPREAD":
        hosts = sum(_fits(bundle, n) for n in nodes)
        if num_actors > hosts:
            raise IA2Error(f"ray placement: STRICT_SPREAD puts each of {num_actors} {what} actors "
                           f"on its own node but only {hosts} node(s) can hold one; use "
                           f"strategy=PACK or SPREAD, or fewer actors")
    if strategy == "STRICT_PACK":
        packed = {"CPU": num_actors * cpus_per_actor, "GPU": num_actors * gpus_per_actor}
        if not any(_fits(packed, n) for n in nodes):
            raise IA2Error(f"ray placement: STRICT_PACK puts all {num_actors} {what} actors on one "
                           f"node, which needs {packed['CPU']:g} CPU and {packed['GPU']:g} GPU; no "
                           f"node has that ({have}); use strategy=PACK or fewer actors")


def object_store_usage() -> dict[str, float]:
    """Bytes and number of objects in the object stores of the cluster right now (Ray's own
    memory summary; spilled objects not included)."""
    import re

    import ray
    from ray._private.internal_api import memory_summary

    # the cluster this process is connected to, never 'the one found on this host': tests and
    # users can have several local Rays at once
    try:
        text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    except Exception as exc:  # a statistic: never the reason a run fails
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    match = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", text)
    if match is None:
        return {}
    return {"mib": float(match.group(1)), "objects": int(match.group(2))}
