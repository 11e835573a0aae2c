"""Atomic writes (fpsa_train/atomic.py): a failed write leaves the previous version and no temporary behind.
The leftovers of killed folder writes: tests/models/test_checkpoint.py."""

from __future__ import annotations

import os

import pytest

from fpsa_train.atomic import atomic_path, replacing_dir, symlink_atomic, write_text_atomic


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "f.json"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError, match="simulated"), atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("simulated")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]
    with atomic_path(path) as tmp:  # a writer that takes a file name
        with open(tmp, "w") as f:
            f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["f.json"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    final = tmp_path / "sub" / "out"
    with replacing_dir(final) as tmp:  # creates the parent
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError, match="simulated"), replacing_dir(final) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("simulated")
    assert os.listdir(final.parent) == ["out"] and os.listdir(final) == ["a"]
    with replacing_dir(final) as tmp:
        (tmp / "b").write_text("2")
    assert os.listdir(final.parent) == ["out"] and os.listdir(final) == ["b"]


def test_a_link_is_repointed(tmp_path):
    link = tmp_path / "last"
    symlink_atomic("one", link)
    symlink_atomic("two", link)
    assert os.readlink(link) == "two" and sorted(os.listdir(tmp_path)) == ["last"]
