"""slurm/lib/ray_wait_nodes.py ADDRESS NUM_NODES TIMEOUT_S: wait until NUM_NODES Ray nodes are alive.

Prints ``ray cluster: K/N nodes joined (ip, ...)`` and exits 0 once K == N, 1 on timeout. The auth
token comes from the environment (RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH), as for every client.
"""

import sys
import time

import ray


def main(address: str, expected: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:  # the head may still be starting: retry the connection itself
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
            break
        except Exception as exc:  # noqa: BLE001 - any failure to connect is retried until the deadline
            if time.monotonic() > deadline:
                print(f"ray cluster: no head at {address} after {timeout_s:g} s ({exc})", file=sys.stderr)
                return 1
            time.sleep(2)
    alive = []
    while time.monotonic() < deadline:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if len(alive) >= expected:
            break
        time.sleep(1)
    ips = ", ".join(sorted(n["NodeManagerAddress"] for n in alive))
    print(f"ray cluster: {len(alive)}/{expected} nodes joined ({ips})", file=sys.stderr, flush=True)
    ray.shutdown()
    return 0 if len(alive) >= expected else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
