"""hdcli.rundir: atomic writes keep the old file whole when a write fails, and leave no temp file behind."""

from __future__ import annotations

import os

import pytest

from hdcli import rundir


def test_atomic_write_replaces_text_and_bytes(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    rundir.atomic_write(path, "one")
    rundir.atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["f.txt"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = tmp_path / "f.json"
    rundir.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError), rundir.replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert rundir.read_json(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["f.json"]


def test_read_json_is_none_for_missing_cut_or_non_object_files(tmp_path):
    assert rundir.read_json(tmp_path / "missing.json") is None
    (tmp_path / "cut.json").write_text('{"a": ')
    (tmp_path / "list.json").write_text("[1]")
    assert rundir.read_json(tmp_path / "cut.json") is None
    assert rundir.read_json(tmp_path / "list.json") is None


def test_a_run_lock_is_exclusive_names_its_holder_and_is_free_after_release(tmp_path):
    from hdcli.errors import HDError

    first = rundir.RunLock(tmp_path, "hd").acquire()
    with pytest.raises(HDError, match=rf"in use by another run \(pid {os.getpid()} on "):
        rundir.RunLock(tmp_path).acquire()
    first.release()
    again = rundir.RunLock(tmp_path).acquire()
    assert again.took_over is None  # a released lock names nobody
    again.release()


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / rundir.LOCK).write_text("pid 999999 on elsewhere since 2026-01-01T00:00:00: hd distill\n")
    lock = rundir.RunLock(tmp_path).acquire()  # no process holds the flock: free
    assert lock.took_over.startswith("pid 999999 on elsewhere")
    lock.release()
