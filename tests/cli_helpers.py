"""Run `p2pfs mount` through its real command line (click parsing, the config file, flag
layering, the cross-layer checks) up to the point where it would start the daemon, and
give back the Config it would start it with. Only `run_daemon` is replaced: these tests
are about what flags and files turn into, not about mounting."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pytest
from click.testing import CliRunner, Result

from p2pfs.config import Config


def mount_config(monkeypatch: pytest.MonkeyPatch, cwd: Path, args: Sequence[str]
                 ) -> tuple[Config | None, Result]:
    """(the Config `p2pfs mount ARGS --foreground` would run, the CLI's result); the
    Config is None when the command refused the arguments (the result says why)."""
    import p2pfs.daemon
    from p2pfs.cli import main

    seen: list[Config] = []

    async def run_daemon(cfg: Config, url: str, mountpoint: Path, **_: object) -> None:
        seen.append(cfg)

    monkeypatch.setattr(p2pfs.daemon, "run_daemon", run_daemon)
    monkeypatch.chdir(cwd)  # the foreground mount moves to "/"; monkeypatch moves back
    result = CliRunner().invoke(main, ["mount", *args, "--foreground"])
    return (seen[0] if seen and result.exit_code == 0 else None), result
