"""The background log rotates by size while the program runs and keeps a few old files."""

from __future__ import annotations

import io

import pytest

from common.logfile import RotatingLog, rotate_if_larger

pytestmark = pytest.mark.timeout(30)


def test_the_log_rotates_by_size_and_keeps_only_the_newest_backups(tmp_path):
    path = tmp_path / "relay.log"
    line = b"x" * 99 + b"\n"
    with RotatingLog(path, max_bytes=1000, backups=3) as log:
        for number in range(100):  # 10,000 bytes: ten files' worth
            log.write(b"%04d" % number + line[4:])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["relay.log", "relay.log.1", "relay.log.2", "relay.log.3"]
    assert all(p.stat().st_size <= 1000 for p in tmp_path.iterdir())
    assert path.read_bytes().splitlines()[-1].startswith(b"0099")  # the newest lines are in the live file
    assert (tmp_path / "relay.log.1").read_bytes().splitlines()[-1].startswith(b"0089")
    assert not any(b"0000" in p.read_bytes() for p in tmp_path.iterdir())  # the oldest were dropped


def test_a_worker_stream_is_copied_line_by_line_and_an_unended_last_line_is_kept(tmp_path):
    path = tmp_path / "client.log"
    with RotatingLog(path) as log:
        log.copy_from(io.BytesIO(b"one\ntwo\nTraceback without newline"))
        log.write_line("supervisor: worker exited with 1")
    assert path.read_bytes() == b"one\ntwo\nTraceback without newline\nsupervisor: worker exited with 1\n"


def test_a_large_log_is_rotated_at_start_and_a_small_one_is_not(tmp_path):
    path = tmp_path / "relay.log"
    path.write_bytes(b"a" * 2000)
    rotate_if_larger(path, max_bytes=5000)
    assert path.exists() and not (tmp_path / "relay.log.1").exists()
    rotate_if_larger(path, max_bytes=1000)
    assert not path.exists() and (tmp_path / "relay.log.1").stat().st_size == 2000
