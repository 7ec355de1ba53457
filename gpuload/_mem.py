"""Host memory figures of this process, from /proc/self/status (Linux).

VmHWM is the peak resident set, file-backed pages included: a loader that maps the file
shows the mapped model in it. RssAnon counts anonymous memory only (heap, staging buffers,
tensors we allocated): that is what a loader's memory bound is about, since mapped file
pages are page cache the kernel can drop.
"""

from __future__ import annotations

import resource


def status() -> dict[str, int]:
    """{'VmHWM': bytes, 'VmRSS': ..., 'RssAnon': ..., 'RssFile': ...} (what the kernel has)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def peak_rss() -> int:
    return status().get("VmHWM", 0)


def rss_anon() -> int:
    return status().get("RssAnon", 0)
