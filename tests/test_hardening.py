"""Issue 18: what the mount shows (--file-mode, --dir-mode), a cache dir as private as the
mount, bucket names S3-compatible stores use."""

import os
import stat

import pytest

from conftest import read_uncached
from tieredfs.config import Config, build_config, normalize, parse_s3_url
from tieredfs.errors import ConfigError


@pytest.mark.parametrize("name", ["ds", "Old_Bucket", "a", "x" * 300, "my.bucket-1"])
def test_bucket_names_are_the_servers_to_judge(name):
    assert parse_s3_url(f"s3://{name}/p") == (name, "p/")


@pytest.mark.parametrize("name", ["", ".", "..", "a\\b", "a\x00b", "a\nb"])
def test_bucket_names_that_would_break_a_path_are_refused(name):
    with pytest.raises(ConfigError):
        parse_s3_url(f"s3://{name}")


def test_modes_are_octal_in_toml_and_cli():
    c = build_config("s3://b", normalize({"file-mode": "0640"}), normalize({"dir_mode": "750"}))
    assert (c.file_mode, c.dir_mode) == (0o640, 0o750)
    assert Config("b").validate().file_mode == 0o444


def test_mount_shows_the_modes_asked_and_the_cache_is_private(bucket, put, mount_factory):
    data = put("d/f.bin", os.urandom(100_000))
    m = mount_factory(bucket, "--file-mode", "0440", "--dir-mode", "0550", "--block-size", "64K")
    assert stat.S_IMODE(os.stat(m.path / "d" / "f.bin").st_mode) == 0o440
    assert stat.S_IMODE(os.stat(m.path / "d").st_mode) == 0o550
    assert read_uncached(m.path / "d" / "f.bin") == data
    m.settle()
    cache = m.cache_dir
    dirs = [cache, cache / "blocks", cache / "index.lmdb",
            *[p for p in (cache / "blocks").rglob("*") if p.is_dir()]]
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert any(p.parent.parent.name == "blocks" for p in files)  # a block file was written
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in dirs} == {oct(0o700)}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o600)}, files


def test_a_cache_dir_others_can_read_is_warned_about(bucket, put, mount_factory, tmp_path):
    cache = tmp_path / "shared-cache"
    cache.mkdir(mode=0o755)
    os.chmod(cache, 0o755)
    m = mount_factory(bucket, cache_dir=cache)
    assert "event=cache_dir_not_private" in m.log.read_text()


def test_fuse_queue_flags_reach_the_kernel_and_the_config(bucket, put, mount_factory):
    from tieredfs.devserver import wait_until
    from tieredfs.fusectl import CONNECTIONS

    data = put("f", os.urandom(1000))
    m = mount_factory(bucket, "--fuse-max-background", "77", "--fuse-max-requests", "64",
                      "--readahead-idle", "3")
    st = os.stat(m.path)
    knob = CONNECTIONS / str((os.major(st.st_dev) << 20) | os.minor(st.st_dev)) / "max_background"
    # Raised in a worker thread once the mount answers: wait for it, bounded.
    assert wait_until(lambda: knob.read_text().strip() == "77", timeout=10), knob.read_text()
    assert read_uncached(m.path / "f") == data
    config = build_config("s3://b", {}, normalize({"fuse_max_requests": 64, "readahead_idle": 3.0}))
    assert (config.fuse_max_requests, config.readahead_idle) == (64, 3.0)
