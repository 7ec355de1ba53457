"""Units: config layering (defaults < TOML < flags) and CLI errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from p2pfs.config import Config, GiB, MiB, load_config, override, parse_size
from p2pfs.errors import ConfigError
from p2pfs.origin import parse_url


def test_sizes():
    assert parse_size("200GiB") == 200 * GiB
    assert parse_size("512M") == 512 * MiB
    assert parse_size("1.5KiB") == 1536
    assert parse_size(4096) == 4096
    with pytest.raises(ConfigError):
        parse_size("lots")


def test_toml_then_flags(tmp_path: Path):
    f = tmp_path / "p2pfs.toml"
    f.write_text('[cache]\nsize = "2GiB"\ndir = "/x"\n[fetch]\nread_timeout = 3\n[s3]\nanonymous = true\n')
    cfg = load_config(f)
    assert cfg.cache.size == 2 * GiB and str(cfg.cache.dir) == "/x"
    assert cfg.fetch.read_timeout == 3.0 and cfg.s3.anonymous is True
    assert cfg.fetch.concurrency == Config().fetch.concurrency
    cfg2 = override(cfg, cache={"size": "1GiB", "dir": None})
    assert cfg2.cache.size == GiB and str(cfg2.cache.dir) == "/x"


@pytest.mark.parametrize("text, msg", [
    ("[cache]\nsise = 1\n", "unknown setting 'sise'"),
    ("[nope]\nx = 1\n", "unknown section"),
    ("[s3]\nanonymous = 'yes'\n", "not a valid value"),
    ("[cache\n", "config file"),
])
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, msg: str):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=msg):
        load_config(f)


def test_urls():
    assert parse_url("s3://b/a/b/").prefix == "a/b/"
    assert parse_url("s3://b").prefix == ""
    assert parse_url("file:///srv/data//models").bucket == "/srv/data"
    for bad in ("s3:///x", "http://x/y", "file://rel"):
        with pytest.raises(ConfigError):
            parse_url(bad)


@pytest.mark.parametrize("args, msg", [
    (["status", "/"], "not a running p2pfs mount"),
    (["mount", "ftp://x", "/tmp"], "unsupported scheme"),
    (["--config", "/nonexistent.toml", "index", "s3://b/p"], "does not exist"),
])
def test_cli_errors_are_one_line(args, msg):
    r = subprocess.run([sys.executable, "-m", "p2pfs", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert msg in r.stderr and "Traceback" not in r.stderr
