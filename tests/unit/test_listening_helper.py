"""The socket watcher used by the security tests finds a cluster's processes by their environment;
a process caught between fork and exec (its parent's environment still showing) is found once it
has exec'd."""

import os
import sys
import time

from tests.helpers.listening import processes


def test_a_child_seen_before_its_exec_is_matched_after_it(tmp_path):
    marker = str(tmp_path / "home")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: wait for the go, then exec with the private HOME
        try:
            os.close(write_end)
            os.read(read_end, 1)
            os.execve(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)"],
                      {**os.environ, "HOME": marker})
        finally:
            os._exit(1)
    os.close(read_end)
    cache: dict = {}
    try:
        assert pid not in processes({"HOME": marker}, cache)  # still the parent's environment
        os.write(write_end, b"x")
        deadline = time.monotonic() + 20
        while pid not in processes({"HOME": marker}, cache):
            assert time.monotonic() < deadline, "the exec'd child was never matched"
            time.sleep(0.05)
    finally:
        os.close(write_end)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
