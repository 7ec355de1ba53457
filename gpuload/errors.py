"""The gpuload exception tree.

    GpuloadError
    ├── HeaderError            a safetensors header that is malformed or lies (names the tensor)
    ├── IndexFileError         a sharded checkpoint's index (model.safetensors.index.json) is wrong
    ├── ReadError              the file could not be read: missing, unreadable, shorter than it says
    ├── UnsupportedDtype       a dtype the format defines but torch cannot hold (F6_*)
    ├── DeviceError            the device asked for does not exist here (e.g. "cuda" with no GPU)
    ├── LoadIntoError          tensors do not fit a module: missing/unexpected names, shapes
    └── PrefetchError          p2pfs could not make a file local (wraps p2pfs's own error)

Errors of the layers below (OSError, json, torch, p2pfs) are mapped to these where they
happen (`_io.py`, `_format.py`, `_p2pfs.py`); nothing else escapes the public API except
bugs. The CLI prints `gpuload: error: <message>` for any of them and exits 1.
"""

from __future__ import annotations


class GpuloadError(Exception):
    """Base of every error gpuload raises on purpose."""


class HeaderError(GpuloadError):
    """The safetensors header is malformed. `tensor` names the offending entry, if any."""

    def __init__(self, message: str, *, tensor: str | None = None, path: str | None = None) -> None:
        self.message = message
        self.tensor = tensor
        self.path = path
        where = f"{path}: " if path else ""
        what = f"tensor {tensor!r}: " if tensor is not None else ""
        super().__init__(f"{where}invalid safetensors header: {what}{message}")

    def with_path(self, path: str) -> "HeaderError":
        """The same error, now saying which file it came from (the parser sees only bytes)."""
        return HeaderError(self.message, tensor=self.tensor, path=path)


class IndexFileError(GpuloadError):
    pass


class ReadError(GpuloadError):
    pass


class UnsupportedDtype(GpuloadError):
    pass


class DeviceError(GpuloadError):
    pass


class LoadIntoError(GpuloadError):
    pass


class PrefetchError(GpuloadError):
    pass
