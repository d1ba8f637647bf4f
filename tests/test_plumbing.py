"""qdistill.cli, run_files, torchrun: atomic writes, stale temp folders."""

import os

from qdistill import run_files


def test_stale_temp_folders_are_cleaned_and_live_ones_kept(tmp_path):
    target = tmp_path / "index"
    dead = tmp_path / ".index.999999999.abc.tmp"  # no such pid: a killed build's leftover
    live = tmp_path / f".index.{os.getpid()}.xyz.tmp"  # a running writer's: kept
    dead.mkdir()
    live.mkdir()
    with run_files.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1" and not dead.exists() and live.exists()


def test_atomic_writes_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run_files.write_json(tmp_path / "a.json", {"x": 1})
        with run_files.atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
