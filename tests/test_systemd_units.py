"""The systemd units: ordered before containerd, Type=notify, and every flag their
ExecStart passes is one the command really takes (checked by click's own parser)."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read_string((UNITS / name).read_text().replace("\\\n", " "))
    return cp


def argv(cp: configparser.ConfigParser) -> list[str]:
    words = shlex.split(cp["Service"]["ExecStart"])
    return [w.replace("${P2PFS_SOURCE}", "s3://b/p").replace("${P2PFS_LAYERS}", "s3://b/layers")
            .replace("%i", "x").replace("%I", "x") for w in words]


@pytest.mark.parametrize("name", ["p2pfs@.service", "p2pfs-snapshotter.service"])
def test_units_notify_and_start_before_containerd(name):
    cp = unit(name)
    assert cp["Service"]["Type"] == "notify"
    assert "containerd.service" in cp["Unit"]["Before"]


def test_the_snapshotter_wants_the_layers_mount_but_is_not_bound_to_it():
    cp = unit("p2pfs-snapshotter.service")
    assert "p2pfs@var-lib-p2pfs-layers.service" in cp["Unit"]["Wants"]
    assert "p2pfs@var-lib-p2pfs-layers.service" in cp["Unit"]["After"]
    assert "BindsTo" not in cp["Unit"] and "Requires" not in cp["Unit"]
    assert cp["Service"]["KillMode"] == "process"


def test_exec_start_flags_exist():
    from p2pfs.cli import main as p2pfs_main
    from snapshotter.cli import main as snap_main

    words = argv(unit("p2pfs-snapshotter.service"))
    assert words[0].endswith("p2pfs-snapshotter") and words[1] == "serve"
    snap_main.commands["serve"].make_context("serve", words[2:])  # raises on an unknown flag

    words = argv(unit("p2pfs@.service"))
    assert words[0].endswith("/p2pfs")
    assert words[1] == "--config" and words[3] == "mount", words
    p2pfs_main.commands["mount"].make_context("mount", words[4:])
