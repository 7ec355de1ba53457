"""Modes of what p2pfs keeps on local disk (the cache dir, its manifests, the daemon log).

The cache holds the plain bytes of every file read through the mount, whatever that file's
mode says on the mount: a chunk file readable by others would let a user who is denied
`cat MNT/secret` read the same bytes from the cache. So nothing we create is readable by
another user: directories 0700, files 0600, set explicitly (`fchmod`/`chmod` after
creating), never left to the umask. The one exception is the cache dir itself, 0711: others
may traverse it (the control socket in it is reachable by the clients it authorises) but
not list it, and everything in it is 0700/0600.

An existing cache (from an older p2pfs, or copied in with other modes) is tightened at
start-up by `tighten`, which the disk cache's scan calls for what p2pfs keeps there.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

ROOT_MODE = 0o711
DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path, mode: int = DIR_MODE) -> None:
    """Create `path` (its missing parents as `mkdir -p` would) with exactly `mode`; an
    existing directory keeps its mode (`tighten` fixes those)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    os.chmod(path, mode)  # the umask may have taken bits away (or left none to enter)


def private_open(path: Path | str, flags: int) -> int:
    """os.open with O_CREAT and a result of exactly FILE_MODE whatever the umask."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: Path, data: bytes) -> None:
    """Write `data` as the whole file `path`, mode FILE_MODE."""
    fd = private_open(path, os.O_WRONLY | os.O_TRUNC)
    with open(fd, "wb", buffering=0) as f:
        f.write(data)


def tighten(root: Path, owned: tuple[str, ...]) -> int:
    """Take from `root` any permission ROOT_MODE does not give (a stricter root, e.g. 0700,
    stays so), and give each of the `owned` names under it, and everything below those,
    DIR_MODE (directories) or FILE_MODE (regular files); return how many were changed.
    Only what p2pfs writes is named, so a cache dir that also holds other things keeps
    their modes. Symlinks are neither followed nor changed, nor are sockets and other
    special files (the control socket has its own mode)."""
    st = os.lstat(root)
    fixed = int(fix_mode(root, st, (stat.S_IMODE(st.st_mode) & ROOT_MODE) | DIR_MODE))
    stack = [Path(root) / name for name in owned]
    while stack:
        path = stack.pop()
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            fixed += fix_mode(path, st, FILE_MODE)
        elif stat.S_ISDIR(st.st_mode):
            fixed += fix_mode(path, st, DIR_MODE)
            stack.extend(Path(e.path) for e in os.scandir(path))
    return fixed


def fix_mode(path: Path | str, st: os.stat_result, mode: int) -> bool:
    """chmod `path` (as lstat'ed in `st`) to `mode` if it has another; True if changed."""
    if stat.S_IMODE(st.st_mode) == mode:
        return False
    try:
        os.chmod(path, mode)  # a directory or regular file: nothing to follow
    except FileNotFoundError:
        return False
    return True
