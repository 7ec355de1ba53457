"""Cache layouts for warm reads, measured side by side (issue 10; docs/ARCHITECTURE.md,
"Why files are kept whole"): one contiguous local file, one sparse file whose 8 MiB chunks
were written at their offsets in random order with O_DIRECT (format 2's data file), and
one file per chunk in 256 directories (format 1), each read with the page cache dropped.

    sudo .venv/bin/python bench/probe_cache_layouts.py [chunks, default 256 = 2 GiB]

Writes its files under a temp dir in /var/tmp and removes them.
"""
import os, sys, time, mmap, random, ctypes, statistics, subprocess
import numpy as np
import tempfile, shutil
D = tempfile.mkdtemp(prefix="layouts-", dir="/var/tmp")
CH = 8 << 20
N = int(sys.argv[1]) if len(sys.argv) > 1 else 256
os.makedirs(D, exist_ok=True)
libc = ctypes.CDLL(None, use_errno=True)
MADV_POPULATE_READ = 22

def drop():
    os.sync(); open("/proc/sys/vm/drop_caches", "w").write("3\n"); time.sleep(2)

def aligned(n):
    m = mmap.mmap(-1, n); return m

def make():
    buf = aligned(CH)
    rng = np.random.default_rng(1)
    order = list(range(N)); random.Random(2).shuffle(order)
    # local contiguous
    with open(f"{D}/local", "wb") as f:
        for i in range(N):
            f.write(rng.integers(0, 255, CH, dtype=np.uint8).tobytes())
    os.sync()
    src = os.open(f"{D}/local", os.O_RDONLY)
    # chunk files in 256 subdirs, O_DIRECT, shuffled order
    os.makedirs(f"{D}/chunks", exist_ok=True)
    fd_sparse = os.open(f"{D}/sparse", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    os.ftruncate(fd_sparse, N * CH)
    for i in order:
        os.preadv(src, [buf], i * CH)
        sub = f"{D}/chunks/{i % 256:02x}"; os.makedirs(sub, exist_ok=True)
        fd = os.open(f"{sub}/{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        os.pwritev(fd, [buf], 0); os.close(fd)
        os.pwritev(fd_sparse, [buf], i * CH)
    os.close(fd_sparse); os.close(src); os.sync()

def touch(m, n):
    a = np.frombuffer(m, dtype=np.uint8, count=n)
    return int(a[::4096].sum())

def populate(addr, n):
    r = libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(n), MADV_POPULATE_READ)
    assert r == 0, ctypes.get_errno()

def t_local():
    drop(); t = time.perf_counter()
    from safetensors import safe_open  # not a safetensors file; use mmap touch instead
    fd = os.open(f"{D}/local", os.O_RDONLY); m = mmap.mmap(fd, N * CH, prot=mmap.PROT_READ); os.close(fd)
    touch(m, N * CH); d = time.perf_counter() - t; m.close(); return d

def addr_of(m):
    return ctypes.addressof(ctypes.c_char.from_buffer(m)) if False else None

libc.mmap.restype = ctypes.c_void_p
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
def t_populate_file(path):
    drop(); t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    a = libc.mmap(None, N * CH, 1, 1, fd, 0); os.close(fd)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda i: populate(a + i * (64 << 20), 64 << 20), range(N * CH // (64 << 20))))
    d = time.perf_counter() - t; libc.munmap(ctypes.c_void_p(a), ctypes.c_size_t(N * CH)); return d

def t_chunks(threads=4):
    drop(); t = time.perf_counter()
    base = libc.mmap(None, N * CH, 0, 0x22, -1, 0)  # reserve PROT_NONE anon
    fds = [os.open(f"{D}/chunks/{i % 256:02x}/{i}", os.O_RDONLY) for i in range(N)]
    for i, fd in enumerate(fds):
        r = libc.mmap(ctypes.c_void_p(base + i * CH), CH, 1, 1 | 0x10, fd, 0)
        assert r == base + i * CH
        os.close(fd)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(lambda i: populate(base + i * (64 << 20), 64 << 20), range(N * CH // (64 << 20))))
    d = time.perf_counter() - t; libc.munmap(ctypes.c_void_p(base), ctypes.c_size_t(N * CH)); return d

def t_odirect_chunks():
    drop(); t = time.perf_counter()
    buf = aligned(CH)
    for i in range(N):
        fd = os.open(f"{D}/chunks/{i % 256:02x}/{i}", os.O_RDONLY | os.O_DIRECT); os.preadv(fd, [buf], 0); os.close(fd)
    return time.perf_counter() - t

def t_odirect_sparse(req=32 << 20):
    drop(); t = time.perf_counter()
    buf = aligned(req); fd = os.open(f"{D}/sparse", os.O_RDONLY | os.O_DIRECT)
    for off in range(0, N * CH, req): os.preadv(fd, [buf], off)
    os.close(fd); return time.perf_counter() - t

if __name__ == "__main__":
    make()
    res = {}
    for r in range(3):
        for name, fn in [("local mmap touch", t_local), ("local populate x4", lambda: t_populate_file(f"{D}/local")),
                         ("sparse populate x4", lambda: t_populate_file(f"{D}/sparse")),
                         ("chunk files mapped populate x4", t_chunks),
                         ("chunk files O_DIRECT serial", t_odirect_chunks), ("sparse O_DIRECT 32M serial", t_odirect_sparse)]:
            res.setdefault(name, []).append(fn())
    shutil.rmtree(D)
    for k, v in res.items(): print(f"{k:35s} median {statistics.median(v):.3f}  {[round(x,3) for x in v]}")
