"""The private local Ray of a run: its token and its ports confined to this machine.

Ray reads these settings from the environment when it is imported, so ``private_ray_settings``
runs before anything imports ray (the CLI and ``ia2dist.run`` call it for ``dist.backend: ray``
without ``dist.ray_address``); this module itself does not import ray.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import socket
import sys
import tempfile


def private_ray_settings() -> None:
    """Before a private local Ray starts: its token and its ports confined to this machine."""
    private_ray_auth()
    private_ray_local_only()


def private_ray_auth() -> None:
    """The private local Ray of this run gets token authentication with a FRESH token in a
    user-only file (0600 in a 0700 temp dir, deleted at exit), handed to its processes through the
    environment. Ray reads these settings when it is imported, so this must run first; when Ray
    is already imported (ia2dist used as a library), Ray's own default applies and a warning says so.
    IA2_RAY_AUTH=off turns authentication off explicitly (with a warning)."""
    if os.environ.get("IA2_RAY_AUTH", "token") == "off":
        os.environ["RAY_AUTH_MODE"] = "disabled"
        print("ia2dist: WARNING: Ray token authentication is OFF (IA2_RAY_AUTH=off): anyone who "
              "can reach this machine's Ray ports can run code as you", file=sys.stderr)
        return
    if "ray" in sys.modules:
        print("ia2dist: note: Ray was imported before ia2dist could give the local Ray a per-run "
              "token; it uses Ray's default token authentication (~/.ray/auth_token)",
              file=sys.stderr)
        return
    directory = tempfile.mkdtemp(prefix="ia2auth_")  # 0700
    path = os.path.join(directory, "token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=path)
    atexit.register(shutil.rmtree, directory, True)


def private_ray_local_only() -> None:
    """The private local Ray listens on 127.0.0.1 only. Ray replaces a loopback node address with
    the machine's own (so that other machines could join) and then binds its gRPC ports on every
    interface, unless multi-machine clusters are switched off with
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's switch for single-machine Ray, honoured on every
    platform). Ray reads it when it is imported, so this must run first; when Ray was imported
    already, cluster.connect says that the ports are not confined to 127.0.0.1. The student
    workers' gloo and NCCL connections go over the loopback interface (GLOO_SOCKET_IFNAME,
    NCCL_SOCKET_IFNAME, each unless set: NCCL would otherwise listen on its first non-loopback
    interface). Its workers run at the priority of the run itself (RAY_worker_niceness=0 unless
    set). IA2_RAY_METRICS is checked here, before anything is written."""
    if "ray" not in sys.modules:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        # Ray starts its workers at nice 15; in a run's own Ray they are the run's compute (the
        # teacher actors, the student ranks), which would then get almost no CPU beside any other
        # process of the machine (a job 5-10x slower on a busy 2-core node). Unless set.
        os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        loopback = [name for _, name in socket.if_nameindex() if name in ("lo", "lo0")]
    except OSError:
        loopback = []
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if loopback and not os.environ.get(key):
            os.environ[key] = loopback[0]
    from ia2dist.backends.ray.cluster import ray_metrics_enabled  # imports ray: after the settings

    ray_metrics_enabled()
