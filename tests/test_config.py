"""Units: config layering (defaults < TOML < flags, one implementation shared with the
scaler), range checks of every setting, path resolution, and CLI errors without
tracebacks (global options after the command included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import mount_config

from p2pfs.config import (CacheConfig, Config, FetchConfig, GiB, MiB, MountConfig,
                          PeersConfig, PublishConfig, S3Config, absolute_paths, complete,
                          load_config, override, parse_size)
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


@pytest.mark.parametrize("cls, kwargs, msg", [
    (FetchConfig, {"concurrency": 0}, r"\[fetch\] concurrency = 0: must be between 1 and 1024"),
    (FetchConfig, {"read_timeout": 0.0}, r"read_timeout = 0.0: must be > 0 and <= 86400"),
    (FetchConfig, {"read_timeout": float("nan")}, r"read_timeout = nan"),
    (FetchConfig, {"retry_base": 1.0, "retry_max": 0.5}, r"retry_max = 0.5: must be >= retry_base"),
    (FetchConfig, {"readahead_min": 2 * MiB, "readahead_max": MiB}, r"readahead_max .* >= readahead_min"),
    (FetchConfig, {"max_request": 1}, r"max_request = 1: must be between 4KiB and 1GiB"),
    (FetchConfig, {"concurrency": "8"}, r"concurrency = '8': expected an integer"),
    (FetchConfig, {"concurrency": True}, r"concurrency = True: expected an integer"),
    (CacheConfig, {"size": -1}, r"\[cache\] size = -1: must be between 0 and 1024TiB"),
    (CacheConfig, {"writeback_workers": 0}, r"writeback_workers = 0: must be between 1 and 64"),
    (S3Config, {"upload_part_size": MiB}, r"upload_part_size = 1048576: must be between 5MiB and 5GiB"),
    (S3Config, {"endpoint_url": "localhost:8333"}, r"endpoint_url .* http:// or https://"),
    (S3Config, {"connect_timeout": -1.0}, r"connect_timeout = -1.0: must be > 0"),
    (MountConfig, {"max_background": 0}, r"\[mount\] max_background = 0: must be between 1 and 65535"),
    (MountConfig, {"metrics_addr": "127.0.0.1:99999"}, r"port must be a number from 0 to 65535"),
    (MountConfig, {"metrics_addr": "9464"}, r"expected HOST:PORT"),
    (MountConfig, {"metrics_addr": ":9464"}, r"expected HOST:PORT"),
    (MountConfig, {"metrics_addr": "::1:9464"}, r"IPv6 host in brackets"),
    (MountConfig, {"metrics_addr": "[nope]:9464"}, r"not an IPv6 address"),
    (MountConfig, {"metrics_addr": "a b:80"}, r"not a host name"),
    (PublishConfig, {"chunk_size": GiB}, r"chunk_size = 1073741824: must be between 4KiB and 64MiB"),
    (PeersConfig, {"replicas": 0}, r"\[peers\] replicas = 0: must be between 1 and 8"),
    (PeersConfig, {"replicas": 9}, r"replicas = 9: must be between 1 and 8"),
    (PeersConfig, {"hedge_fraction": 0.6}, r"hedge_fraction = 0.6: must be between 0 and 0.5"),
    (PeersConfig, {"connect_timeout": 0.0}, r"connect_timeout = 0.0: must be > 0"),
    (PeersConfig, {"connect_timeout": 3.0}, r"connect_timeout = 3.0: must be <= request_timeout"),
    (PeersConfig, {"max_uploads": 0}, r"max_uploads = 0: must be between 1 and 4096"),
    (PeersConfig, {"upload_rate": -1}, r"upload_rate = -1: must be between 0 and 1TiB"),
    (PeersConfig, {"ban_base": 60.0, "ban_max": 30.0}, r"ban_max = 30.0: must be >= ban_base"),
    (PeersConfig, {"members": ["a:1"]}, r"members = \['a:1'\]: expected a list of strings"),
    (PeersConfig, {"members": ("a:1", 2)}, r"expected a list of strings"),
    (PeersConfig, {"members": ("10.0.0.1",)}, r"\[peers\] members: expected HOST:PORT"),
    (PeersConfig, {"members": ("::1:7946",)}, r"IPv6 host in brackets"),
    (PeersConfig, {"members": ("10.0.0.1:0",)}, r"port must be a number from 1 to 65535"),
    (PeersConfig, {"dns": "p2pfs-peers"}, r"\[peers\] dns: expected HOST:PORT"),
    (PeersConfig, {"listen": "0.0.0.0:7946"}, r"listen = '0.0.0.0:7946': give this node's own"),
    (PeersConfig, {"listen": "[::]:7946"}, r"not a wildcard"),
    (PeersConfig, {"listen": "10.0.0.7:99999"}, r"\[peers\] listen: .*port must be"),
])
def test_settings_are_checked_when_built(cls, kwargs, msg):
    """Regression: FetchConfig(concurrency=0) used to be accepted and fail deep in trio."""
    with pytest.raises(ConfigError, match=msg):
        cls(**kwargs)


def test_good_values_pass_and_ipv6_metrics_addresses_parse():
    assert MountConfig(metrics_addr="[::1]:9464").metrics_host_port == ("::1", 9464)
    assert MountConfig(metrics_addr="localhost:0").metrics_host_port == ("localhost", 0)
    assert MountConfig().metrics_host_port is None
    assert FetchConfig(retry_base=0.01, retry_max=0.05, max_request=256 * 1024).retry_max == 0.05


def test_range_errors_come_from_toml_and_flags(tmp_path: Path):
    f = tmp_path / "c.toml"
    f.write_text("[fetch]\nconcurrency = 0\n")
    with pytest.raises(ConfigError, match=r"concurrency = 0: must be between 1 and 1024"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"\[cache\] size = 'lots' is not a valid value"):
        override(Config(), cache={"size": "lots"})
    with pytest.raises(ConfigError, match=r"\[cache\] size = 1000000000000000000000000000000: must be"):
        override(Config(), cache={"size": "1" + "0" * 30})
    with pytest.raises(ConfigError, match=r"read_timeout = inf: must be > 0"):
        override(Config(), fetch={"read_timeout": "9" * 400})
    with pytest.raises(ConfigError, match=r"read_timeout = 9+ is not a valid value"):
        override(Config(), fetch={"read_timeout": int("9" * 400)})
    f.write_text("[fetch]\nconcurrency = 1.5\n")
    with pytest.raises(ConfigError, match=r"config file .*c.toml: \[fetch\] concurrency = 1.5"):
        load_config(f)


def test_scaler_uses_the_same_layering(tmp_path: Path):
    """One implementation: the scaler's tables coerce sizes and name the table like p2pfs."""
    from scaler._config import ProxyConfig, build, load_toml
    from scaler._errors import ConfigError as ScalerConfigError

    f = tmp_path / "s.toml"
    f.write_text('[proxy]\nmax_body_bytes = "1MiB"\nport = 9000\n')
    cfg = build(ProxyConfig, load_toml(f)["proxy"], {"port": None, "max_queue": 5})
    assert (cfg.max_body_bytes, cfg.port, cfg.max_queue) == (MiB, 9000, 5)
    with pytest.raises(ScalerConfigError, match=r"\[proxy\] unknown setting 'prot'"):
        build(ProxyConfig, {"prot": 1})
    with pytest.raises(ScalerConfigError, match=r"\[proxy\] port = True is not a valid value"):
        build(ProxyConfig, {"port": True})
    f.write_text("[proxies]\n")
    with pytest.raises(ScalerConfigError, match=r"unknown section \[proxies\]"):
        load_toml(f)


def test_paths_are_made_absolute():
    cfg = override(Config(), cache={"dir": "rel/cache"})
    assert absolute_paths(cfg, cwd="/srv").cache.dir == Path("/srv/rel/cache")
    assert absolute_paths(Config(), cwd="/srv").cache.dir == Config().cache.dir
    assert absolute_paths(override(Config(), cache={"dir": "~/c"})).cache.dir == Path.home() / "c"


def _p2pfs(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2pfs", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


@pytest.mark.parametrize("args, msg", [
    # Global options after the command (regression: "No such option").
    (["index", "s3://b/p", "--config", "/nonexistent.toml"], "does not exist"),
    (["index", "s3://b/p", "--endpoint-url", "localhost:1"], "endpoint_url"),
    (["index", "s3://b/p", "--chunk-size", "1GiB"], "chunk_size = 1073741824: must be between"),
    (["mount", "s3://b/p", "/tmp", "--concurrency", "0"], "concurrency = 0: must be between 1 and 1024"),
    (["mount", "s3://b/p", "/tmp", "--metrics-addr", "127.0.0.1:99999"], "port must be a number"),
    (["mount", "s3://b/p", "/tmp", "--metrics-addr", "nohost"], "expected HOST:PORT"),
])
def test_cli_setting_errors_are_one_line(args, msg):
    r = _p2pfs(*args)
    assert r.returncode == 1, r.stderr
    assert msg in r.stderr and r.stderr.startswith("p2pfs: error: ") and r.stderr.count("\n") == 1


def test_global_options_after_every_command():
    from click.testing import CliRunner

    from p2pfs.cli import main

    assert set(main.commands) >= {"publish", "index", "mount", "status", "prefetch", "unmount"}
    import click

    names = [[n] for n in main.commands]
    names += [[n, sub] for n, cmd in main.commands.items() if isinstance(cmd, click.Group)
              for sub in cmd.commands]
    for name in names:
        r = CliRunner().invoke(main, [*name, "--config", "/x.toml", "--endpoint-url", "http://e",
                                      "-v", "--help"])
        assert r.exit_code == 0, (name, r.output)
        assert "--endpoint-url" in r.output


def test_a_global_option_after_the_command_wins(tmp_path: Path):
    good = tmp_path / "good.toml"
    good.write_text("[fetch]\nconcurrency = 4\n")
    r = _p2pfs("--config", str(good), "index", "s3://b/p", "--config", "/nonexistent.toml")
    assert r.returncode == 1 and "/nonexistent.toml does not exist" in r.stderr


def test_relative_config_path_is_read_from_the_start_directory(tmp_path: Path):
    (tmp_path / "c.toml").write_text("[fetch]\nconcurrency = 0\n")
    r = _p2pfs("index", "s3://b/p", "--config", "c.toml", cwd=str(tmp_path))
    assert r.returncode == 1 and f"{tmp_path}/c.toml" in r.stderr and "concurrency = 0" in r.stderr


def test_scaler_verbose_after_the_command_and_listen_checked(tmp_path: Path):
    from click.testing import CliRunner

    from scaler.cli import main

    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,service_s\n0.0,0.1\n1.0,0.1\n")
    r = CliRunner().invoke(main, ["simulate", "--trace", str(trace), "--json", "-v"])
    assert r.exit_code == 0, r.output
    for name in main.commands:
        assert CliRunner().invoke(main, [name, "-vv", "--help"]).exit_code == 0, name
    r = CliRunner().invoke(main, ["keda", "--listen", "127.0.0.1:99999"])
    assert r.exit_code == 2 and "port must be a number from 0 to 65535" in r.output


# -- [peers] ------------------------------------------------------------------------------
def test_peers_are_off_by_default_and_the_defaults_are_the_documented_ones():
    p = Config().peers
    assert not p.enabled and (p.listen, p.members, p.dns, p.token_file) == (None, (), None, None)
    assert (p.replicas, p.connect_timeout, p.request_timeout, p.refresh_interval) == (1, 0.25, 2.0, 10.0)
    assert (p.max_uploads, p.upload_queue, p.upload_rate) == (16, 64, 0)
    assert (p.hedge_fraction, p.hedge_quantile, p.ban_base, p.ban_max) == (0.05, 0.9, 30.0, 3600.0)
    assert (p.fail_window, p.fail_threshold, p.down_for) == (10.0, 3, 5.0)
    assert (p.token_window, p.drain_timeout) == (30.0, 10.0)
    assert complete(Config()) == Config()  # no peer option: nothing to complete
    # Off, a short read_timeout stays allowed (tests and users set 0.5 s today).
    assert override(Config(), fetch={"read_timeout": 0.5}).fetch.read_timeout == 0.5


def test_peers_from_toml(tmp_path: Path):
    f = tmp_path / "c.toml"
    f.write_text('[peers]\nlisten = "[fd00::7]:7946"\ntoken_file = "tok"\nupload_rate = "100MiB"\n'
                 'members = ["[fd00::7]:7946", "10.0.0.8:7946"]\nreplicas = 2\n')
    cfg = absolute_paths(complete(load_config(f)), cwd="/srv")
    assert cfg.peers.enabled and cfg.peers.listen == "[fd00::7]:7946"
    assert cfg.peers.members == ("[fd00::7]:7946", "10.0.0.8:7946")
    assert cfg.peers.token_file == Path("/srv/tok") and cfg.peers.upload_rate == 100 * MiB
    f.write_text('[peers]\nmembers = "10.0.0.8:7946"\n')  # one string: one member, no error
    assert load_config(f).peers.members == ("10.0.0.8:7946",)
    f.write_text("[peers]\nmembers = [1, 2]\n")
    with pytest.raises(ConfigError, match=r"members = \[1, 2\] is not a valid value"):
        load_config(f)


def test_a_lower_layer_may_hold_half_of_the_peer_settings(tmp_path: Path):
    """The Kubernetes case: the ConfigMap names the DNS name and the token, the flag this
    node's address. Neither layer alone is refused; the finished one is checked."""
    f = tmp_path / "c.toml"
    f.write_text('[peers]\ndns = "p2pfs-peers.kube-system.svc:7946"\ntoken_file = "/t"\n')
    half = load_config(f)
    assert not half.peers.enabled
    with pytest.raises(ConfigError, match=r"members and dns need listen"):
        complete(half)
    full = complete(override(half, peers={"listen": "10.0.0.7:7946"}))
    assert full.peers.enabled and full.peers.dns == "p2pfs-peers.kube-system.svc:7946"


@pytest.mark.parametrize("peers, msg", [
    ({"members": "10.0.0.8:7946"}, r"members and dns need listen .*--peer-listen"),
    ({"dns": "peers.svc:7946"}, r"members and dns need listen"),
    ({"listen": "10.0.0.7:7946"}, r"listen needs token_file .*--cluster-token-file"),
])
def test_incomplete_peer_settings_are_refused(peers, msg):
    with pytest.raises(ConfigError, match=msg):
        complete(override(Config(), peers=peers))


def test_peer_request_timeout_must_leave_time_for_the_origin():
    on = {"listen": "10.0.0.7:7946", "token_file": "/t"}
    with pytest.raises(ConfigError, match=r"\[peers\] request_timeout = 2.0: must be < \[fetch\] "
                                          r"read_timeout \(2.0\)"):
        override(Config(), peers=on, fetch={"read_timeout": 2.0})
    with pytest.raises(ConfigError, match=r"request_timeout = 40.0: must be < \[fetch\] read_timeout"):
        override(Config(), peers={**on, "request_timeout": 40.0})
    # Either layer order: a read_timeout lowered later by a flag is caught too.
    cfg = override(Config(), peers=on, fetch={"read_timeout": 5.0})
    with pytest.raises(ConfigError, match=r"must be < \[fetch\] read_timeout \(1.0\)"):
        override(cfg, fetch={"read_timeout": 1.0})
    assert override(Config(), peers={**on, "request_timeout": 0.5},
                    fetch={"read_timeout": 1.0}).peers.request_timeout == 0.5


def test_mount_flags_land_in_peers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The issue's two command lines, through the real CLI up to the daemon."""
    cfg, r = mount_config(monkeypatch, tmp_path, [
        "s3://models", str(tmp_path / "m"), "--peer-listen", "127.0.0.2:7946",
        "--peers", "127.0.0.2:7946,127.0.0.3:7946, 127.0.0.4:7946",
        "--cluster-token-file", "tok", "--peer-replicas", "2"])
    assert cfg is not None, r.output
    assert cfg.peers.listen == "127.0.0.2:7946" and cfg.peers.replicas == 2
    assert cfg.peers.members == ("127.0.0.2:7946", "127.0.0.3:7946", "127.0.0.4:7946")
    assert cfg.peers.token_file == tmp_path / "tok"  # relative to where p2pfs was started
    cfg, r = mount_config(monkeypatch, tmp_path, [
        "s3://models", str(tmp_path / "m"), "--peer-listen", "10.0.0.7:7946",
        "--peers-dns", "p2pfs-peers.kube-system.svc:7946", "--cluster-token-file", "/etc/p2pfs/token"])
    assert cfg is not None, r.output
    assert cfg.peers.dns == "p2pfs-peers.kube-system.svc:7946" and cfg.peers.members == ()
    cfg, r = mount_config(monkeypatch, tmp_path, ["s3://models", str(tmp_path / "m")])
    assert cfg is not None and not cfg.peers.enabled, r.output


@pytest.mark.parametrize("args, msg", [
    (["--peers", "127.0.0.3:7946"], "members and dns need listen"),
    (["--peer-listen", "127.0.0.2:7946"], "listen needs token_file"),
    (["--peer-listen", "127.0.0.2:7946", "--cluster-token-file", "t", "--peer-replicas", "9"],
     "[peers] replicas = 9: must be between 1 and 8"),
    (["--peers-dns", "nohost", "--peer-listen", "127.0.0.2:1"], "[peers] dns: expected HOST:PORT"),
    (["--peer-listen", "127.0.0.2:7946", "--cluster-token-file", "t", "--read-timeout", "1"],
     "must be < [fetch] read_timeout (1.0)"),
])
def test_bad_peer_flags_are_one_line(args, msg):
    r = _p2pfs("mount", "s3://b/p", "/tmp", *args)
    assert r.returncode == 1, r.stderr
    assert msg in r.stderr and r.stderr.startswith("p2pfs: error: ") and r.stderr.count("\n") == 1


def test_readme_lists_every_setting_with_its_default():
    """The README's configuration block is the reference: every key of every section, each
    with the dataclass's default ("" and [] stand for None and the empty list)."""
    import re
    import tomllib
    import typing

    from p2pfs.settings import coerce

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"### Configuration.*?```toml\n(.*?)```", readme, re.S).group(1)
    doc = tomllib.loads(block)
    cfg = Config()
    assert set(doc) == {f for f in vars(cfg)}
    for section, values in doc.items():
        sub = getattr(cfg, section)
        hints = typing.get_type_hints(type(sub))
        assert set(values) == set(vars(sub)), section
        for key, value in values.items():
            default = getattr(sub, key)
            if value in ("", []):
                assert default in (None, (), ""), (section, key)
            else:
                assert coerce(value, hints[key]) == default, (section, key, value, default)
