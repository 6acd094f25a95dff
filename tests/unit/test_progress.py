"""Progress bars: a redrawn bar on a terminal, a bounded number of plain lines in a file."""

import io
import logging
import os
import re
import time

from ia2dist.progress import progress


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_file_output_is_bounded_by_time():
    """A thousand updates over about a second with a 0.2 s interval: a few lines (one per interval
    and one at the end), never a carriage return, each saying how far it got."""
    out = io.StringIO()
    bar = progress(1000, "shards", "shard", stream=out, interval_s=0.2)
    start = time.monotonic()
    for _ in range(1000):
        bar.update(1)
        bar.set_postfix(loss="0.5")
        time.sleep(0.001)
    bar.close()
    bar.close()  # closing twice writes nothing more
    elapsed = time.monotonic() - start
    lines = _lines(out)
    assert "\r" not in out.getvalue()
    assert 2 <= len(lines) <= elapsed / 0.2 + 2, lines
    assert re.fullmatch(r"\d\d:\d\d:\d\d shards: 1000/1000 shard \(100%\), \d\d:\d\d elapsed, "
                        r"loss=0.5", lines[-1]), lines
    assert all(re.search(r"shards: \d+/1000 shard \(\d+%\)", line) for line in lines), lines
    assert "left" in lines[0], lines


def test_short_bar_in_a_file_is_silent_and_disabled_bar_writes_nothing():
    out = io.StringIO()
    with progress(50, "extract", "prompt", stream=out) as bar:  # 30 s interval
        for _ in range(50):
            bar.update(1)
    off = progress(50, "extract", stream=out, enabled=False)
    off.update(5)
    off.close()
    assert out.getvalue() == ""


def test_each_mode_writes_one_line_per_completed_job():
    """Coarse units (training jobs): one line per completed job, zero-sized updates (a poll that
    found nothing new) write nothing, and closing adds no duplicate."""
    out = io.StringIO()
    bar = progress(3, "students", "job", each=True, stream=out)
    for found in (0, 1, 0, 0, 2):
        bar.update(found)
    bar.close()
    lines = _lines(out)
    assert [line.split(" ", 1)[1].split(",")[0] for line in lines] == \
        ["students: 1/3 job (33%)", "students: 3/3 job (100%)"], lines


def test_file_lines_go_to_the_run_log_when_logging_is_set_up(tmp_path, monkeypatch):
    """Without an explicit stream (the command line's case) the lines go through the ``ia2dist``
    logger, i.e. to stderr and run_dir/run.log; stderr not being a terminal here."""
    from ia2dist.experiment import rundir

    monkeypatch.setattr("sys.stderr", io.StringIO())
    rundir.setup_logging(tmp_path)
    try:
        bar = progress(2, "students", "job", each=True)
        bar.update(1)
        bar.update(1)
        bar.close()
    finally:
        for handler in list(logging.getLogger("ia2dist").handlers):
            handler.close()
            logging.getLogger("ia2dist").removeHandler(handler)
    text = (tmp_path / "run.log").read_text()
    assert text.count("students: ") == 2 and "students: 2/2 job (100%)" in text, text


def test_terminal_output_is_still_a_redrawn_bar():
    """On a terminal (a pseudo-terminal here) it is tqdm's bar: redrawn in place with carriage
    returns, ending at 100%."""
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=True) as tty:
            assert tty.isatty()
            bar = progress(20, "phase 0 (ia2)", "step", stream=tty)
            for _ in range(20):
                bar.update(1)
            bar.close()
            tty.flush()
            data = b""
            os.set_blocking(master, False)
            while True:
                try:
                    chunk = os.read(master, 65536)
                except (BlockingIOError, OSError):
                    break
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(master)
    text = data.decode(errors="replace")
    assert "\r" in text and "phase 0 (ia2)" in text and "100%" in text and "20/20" in text, text
