"""Process-wide settings for steady-state CPU inference and training: memory allocator and threads.

Why the allocator: a network's forward pass allocates and frees the same activation buffers on
every batch. With glibc's defaults every block above the mmap threshold (128 KiB, raised
dynamically to at most 32 MiB) is a fresh ``mmap`` freed with ``munmap``, and free memory at the top
of the heap beyond the trim threshold is handed back to the kernel; either way the next batch
touches new zero-filled pages and pays one minor page fault per 4 KiB. Measured on 2 cores (issue
17): MobileNetV2 at batch 32 spent 23 s of system time for 12 M minor faults, and ran 3.5x faster
once large blocks stayed on the heap. :func:`configure_runtime` therefore raises glibc's mmap and
trim thresholds with ``mallopt`` at start-up (before the first batch), so that freed activation
buffers are reused instead of returned to the kernel. The price is that the process keeps its peak
working set mapped until it exits, which is what a caching or training job wants anyway.

glibc 2.35 and later accept any mmap threshold; older glibc refuse values above
``HEAP_MAX_SIZE / 2`` (32 MiB on 64-bit) through ``mallopt`` *and* through ``MALLOC_MMAP_THRESHOLD_``
alike, so there the threshold is capped and the report says so (``large_blocks_on_heap: False``);
preloading jemalloc or tcmalloc (``LD_PRELOAD``) is the way out on such systems, and an allocator
loaded that way is detected and left alone.

Why the threads: PyTorch, MKL and FAISS size their pools from the machine's core count, which in
a container or a SLURM job can be far more than the cores the process may use (CPU affinity,
cgroup quota); oversubscribed OpenMP pools spin against each other.

Environment (documented in ``docs/performance.md``)::

    SLICE2VOL_ALLOCATOR   auto (default) | glibc[:key=value,...] | system | jemalloc | tcmalloc
                          keys of glibc: mmap_threshold, trim_threshold, top_pad, arena_max (sizes
                          take K/M/G suffixes), e.g. glibc:mmap_threshold=32M,trim_threshold=1G;
                          options replace the project's settings (GLIBC_DEFAULTS), they do not add to them
    SLICE2VOL_THREADS     intra-op threads (default: the cores this process may use; an
                          OMP_NUM_THREADS set by the user is honoured)

Example:
    >>> from slice2vol.runtime import configure_runtime
    >>> configure_runtime()["threads"]
    2
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

ALLOCATOR_ENV = "SLICE2VOL_ALLOCATOR"
THREADS_ENV = "SLICE2VOL_THREADS"

# mallopt(3) parameter numbers (glibc <malloc.h>)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8
_MALLOPT = {"trim_threshold": M_TRIM_THRESHOLD, "top_pad": M_TOP_PAD, "mmap_threshold": M_MMAP_THRESHOLD,
            "arena_max": M_ARENA_MAX}
# mallopt takes a C int: 2 GiB - 1 is the largest value it can carry
_INT_MAX = 2**31 - 1

# The project's glibc settings, chosen by scripts/bench_encoders.py (docs/performance.md): blocks up
# to 1 GiB come from the heap, and the heap is only trimmed when more than 1 GiB is free at its top.
GLIBC_DEFAULTS: dict[str, int] = {"mmap_threshold": 1 << 30, "trim_threshold": 1 << 30}

# allocators that replace malloc when preloaded, by the name their shared object carries
_PRELOADED = {"jemalloc": "libjemalloc", "tcmalloc": "libtcmalloc", "mimalloc": "libmimalloc"}

_state: dict[str, Any] = {}


@dataclass(frozen=True)
class AllocatorSpec:
    """A parsed allocator request.

    Attributes:
        kind: ``auto``, ``glibc``, ``system`` (change nothing), ``jemalloc`` or ``tcmalloc``.
        glibc: mallopt settings to apply when glibc's malloc is in use (``kind`` auto or glibc).
    """

    kind: str
    glibc: tuple[tuple[str, int], ...] = ()


def parse_size(text: str) -> int:
    """``"32M"`` -> 33554432; plain integers are bytes; K/M/G are powers of 1024."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)[iI]?[bB]?\s*", str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (use bytes or a K/M/G suffix, e.g. 512M)")
    value, unit = int(match.group(1)), match.group(2).upper()
    return value << {"": 0, "K": 10, "M": 20, "G": 30}[unit]


def parse_allocator(spec: str | None) -> AllocatorSpec:
    """Parses ``auto``, ``system``, ``jemalloc``, ``tcmalloc`` or ``glibc[:key=value,...]``.

    Raises:
        ValueError: unknown kind or key, or a value mallopt cannot take.
    """
    spec = (spec or "auto").strip()
    kind, _, options = spec.partition(":")
    kind = kind.strip().lower()
    aliases = {"default": "system", "off": "system", "none": "system", "malloc": "glibc"}
    kind = aliases.get(kind, kind)
    if kind not in ("auto", "glibc", "system", "jemalloc", "tcmalloc"):
        raise ValueError(f"{ALLOCATOR_ENV}: unknown allocator {kind!r}; use auto, glibc[:key=value,...], "
                         "system, jemalloc or tcmalloc")
    if options and kind != "glibc":
        raise ValueError(f"{ALLOCATOR_ENV}: options are only for glibc (glibc:mmap_threshold=...), got {spec!r}")
    # bare ``glibc``/``auto``: the project's settings; ``glibc:k=v,...``: exactly those settings
    settings = dict(GLIBC_DEFAULTS) if kind in ("auto", "glibc") and not options else {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in _MALLOPT:
            raise ValueError(f"{ALLOCATOR_ENV}: bad glibc option {item!r}; keys: {', '.join(sorted(_MALLOPT))}")
        number = int(value) if key == "arena_max" else parse_size(value)
        if not 0 <= number <= _INT_MAX:
            raise ValueError(f"{ALLOCATOR_ENV}: {key}={value} is outside mallopt's range (0 .. 2G-1)")
        settings[key] = number
    settings = {k: min(v, _INT_MAX) for k, v in settings.items()}
    return AllocatorSpec(kind, tuple(sorted(settings.items())))


# -- cores ------------------------------------------------------------------------------------------
def available_cpus() -> int:
    """Cores this process may use: CPU affinity, cgroup CPU quota (v1 and v2) and ``LOKY_MAX_CPU_COUNT``.

    Uses joblib's (loky's) count, which scikit-learn uses too, so both agree.
    """
    try:
        from joblib import cpu_count
    except ImportError:  # joblib comes with scikit-learn; without it, affinity alone
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, int(cpu_count()))


def resolve_threads(threads: int | None = None) -> tuple[int, str]:
    """(intra-op thread count, where it came from): argument > SLICE2VOL_THREADS > OMP_NUM_THREADS > cores."""
    if threads is not None:
        source, value = "argument", threads
    elif os.environ.get(THREADS_ENV):
        source, value = THREADS_ENV, os.environ[THREADS_ENV]
    elif os.environ.get("OMP_NUM_THREADS") and "OMP_NUM_THREADS" not in _state.get("env_set", {}):
        source, value = "OMP_NUM_THREADS", os.environ["OMP_NUM_THREADS"]
    else:
        return available_cpus(), "available cores"
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"{source}={value!r}: expected a positive integer") from None
    if count < 1:
        raise ValueError(f"{source}={value!r}: expected a positive integer")
    return count, source


def loader_workers(requested: int | None = None, threads: int | None = None) -> int:
    """DataLoader workers that do not oversubscribe the cores this process may use.

    Each worker runs one thread (PyTorch sets 1 in workers); they share the cores with the
    ``threads`` intra-op threads of the main process, which are idle while the workers read. At
    most ``cores - 1`` workers (at least 0), and never more than requested.

    Args:
        requested: workers asked for (``None``: as many as allowed).
        threads: cores budget (default: :func:`available_cpus`).
    """
    budget = max(0, (threads or available_cpus()) - 1)
    return budget if requested is None else max(0, min(int(requested), budget))


# -- allocator --------------------------------------------------------------------------------------
def loaded_allocator() -> str | None:
    """Name of a malloc replacement mapped into this process (``LD_PRELOAD``), else None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for name, soname in _PRELOADED.items():
        if soname in maps:
            return name
    return None


def find_allocator_library(name: str) -> str | None:
    """Path of an installed jemalloc/tcmalloc shared object (for an ``LD_PRELOAD`` hint), else None."""
    soname = _PRELOADED.get(name, name)
    found = ctypes.util.find_library(soname[3:] if soname.startswith("lib") else soname)
    if found:
        for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                       "/usr/local/lib"):
            if Path(folder, found).exists():
                return str(Path(folder, found))
        return found
    return None


def _libc() -> Any | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def large_block_is_mapped(libc: Any, size: int = 64 << 20) -> bool | None:
    """Does ``malloc(size)`` get its own mmap (True) or come from the heap (False)? None if unknown.

    Reads ``mallinfo2().hblkhd`` (bytes in mmapped blocks) around one allocation: the direct check
    that a threshold set with ``mallopt`` is in force (older glibc cap it silently at 32 MiB).
    """
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _Mallinfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    if not block:
        return None
    try:
        return libc.mallinfo2().hblkhd - before >= size
    finally:
        libc.free(block)


def _apply_glibc(libc: Any, settings: dict[str, int]) -> dict[str, Any]:
    applied, refused = {}, {}
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    for key in ("arena_max", "top_pad", "trim_threshold", "mmap_threshold"):
        if key not in settings:
            continue
        value = settings[key]
        if libc.mallopt(_MALLOPT[key], value) == 1:
            applied[key] = value
        elif key == "mmap_threshold" and libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1:
            # glibc < 2.35: HEAP_MAX_SIZE / 2 is the largest threshold it accepts
            applied[key], refused[key] = 32 << 20, value
        else:
            refused[key] = value
    out: dict[str, Any] = {"glibc": applied}
    if refused:
        out["refused"] = refused
        log.warning("glibc refused mallopt %s (glibc %s); large activations will be re-mapped on every batch: "
                    "preload jemalloc or tcmalloc (LD_PRELOAD) for full speed, see docs/performance.md",
                    refused, platform.libc_ver()[1])
    probe = max(settings.get("mmap_threshold", 0) // 2, 64 << 20) if "mmap_threshold" in applied else None
    if probe:
        mapped = large_block_is_mapped(libc, min(probe, 256 << 20))
        if mapped is not None:
            out["large_blocks_on_heap"] = not mapped
    return out


def _configure_allocator(spec: AllocatorSpec) -> dict[str, Any]:
    preloaded = loaded_allocator()
    if spec.kind == "system":
        earlier = (_state.get("record") or {}).get("glibc")
        # mallopt cannot be undone (glibc's dynamic threshold stays off once a value is set)
        return {"allocator": preloaded or "system defaults",
                **({"still_in_force": earlier} if earlier and not preloaded else {})}
    if preloaded:  # a malloc replacement already runs this process: mallopt would be a no-op on it
        return {"allocator": preloaded, "preloaded": True}
    if spec.kind in ("jemalloc", "tcmalloc"):
        path = find_allocator_library(spec.kind)
        hint = f"LD_PRELOAD={path}" if path else f"install {spec.kind} and set LD_PRELOAD to its library"
        log.warning("%s=%s but %s is not loaded in this process (it must be preloaded: %s); using glibc "
                    "settings instead", ALLOCATOR_ENV, spec.kind, spec.kind, hint)
        spec = AllocatorSpec("glibc", tuple(sorted(GLIBC_DEFAULTS.items())))
    libc = _libc()
    if libc is None:
        return {"allocator": "system defaults (not glibc)"}
    return {"allocator": "glibc", "glibc_version": platform.libc_ver()[1], **_apply_glibc(libc, dict(spec.glibc))}


def release_free_heap() -> bool:
    """Hands the free pages of glibc's heap back to the kernel (``malloc_trim(0)``); call before a fork.

    A process that has run a forward pass keeps its freed activation buffers on the heap for reuse
    (the thresholds above). When it then forks (a DataLoader worker), every one of those pages becomes
    copy-on-write, and the next batch faults once per 4 KiB page it writes; such a fault replaces a
    mapped page, so the kernel must also flush the page from the TLB of every core running one of the
    process's intra-op threads. Measured on the 2-core VM (``scripts/bench_cache.py``, resnet18, a
    worker forked from a warm process): ~80,000 faults and 1.05 s of system time per four-volume job.
    Pages handed back first are not shared with the child; the next batch faults them in as fresh
    zero-filled pages, which needs no flush: about as many faults, 0.23 s of system time, and the
    encoder ran as fast as without a worker. The cost is one walk over the heap's free chunks.

    Returns:
        True if glibc released something, False if not (nothing free, not glibc, or a preloaded
        jemalloc/tcmalloc, whose own heap this does not touch).
    """
    if loaded_allocator():
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return bool(libc.malloc_trim(0))


# -- threads ----------------------------------------------------------------------------------------
def _configure_threads(threads: int) -> dict[str, Any]:
    # libraries not imported yet (torch, MKL, FAISS's OpenMP) read these at load time; child
    # processes inherit them. A value the user set is never overwritten.
    ours = _state.setdefault("env_set", {})
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        if var not in os.environ or var in ours:
            os.environ[var] = ours[var] = str(threads)
    done = {}
    if "torch" in sys.modules:  # already loaded: its pool was sized before the variables were set
        import torch

        torch.set_num_threads(threads)
        done["torch"] = torch.get_num_threads()
    if "faiss" in sys.modules:
        import faiss

        faiss.omp_set_num_threads(threads)
        done["faiss"] = threads
    return done


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Within the block, ``n`` torch intra-op threads (``None`` or 0: unchanged); the caller's count after.

    Note that ``torch.set_num_threads`` also sets the count that threads started later begin with.
    """
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_intra_op_thread() -> None:
    """Gives the calling thread (a reader thread, say) one torch intra-op thread, for good.

    torch starts each new thread's count lazily, at its first parallel call, from the count last set
    by *any* thread; ``set_num_threads(1)`` alone would be undone there if another thread set its own
    count in between. Asking for the count first makes that lazy start happen now.
    """
    import torch

    torch.get_num_threads()  # the thread's lazy start, before anyone else can change the default
    torch.set_num_threads(1)


# -- FAISS exact search --------------------------------------------------------------------------------
#: from this many queries on, exact (flat) search is done as one matrix product (BLAS)
BLAS_MIN_QUERIES = 5


@contextlib.contextmanager
def faiss_blas_for(n_queries: int) -> Iterator[None]:
    """Within the block, FAISS's exact search uses its BLAS kernel for batches of >= ``BLAS_MIN_QUERIES``.

    FAISS 1.15 computes exact inner products with a per-query SIMD loop until ``queries x dim``
    reaches ``distance_compute_blas_threshold`` (128,000: 334 queries at 384 dimensions). Measured on
    2 cores (``IndexFlatIP``, 384-d): 200 queries against 300k vectors take 22 ms each that way and
    1.8 ms as one product; 50 queries against 100k, 8.1 vs 1.0 ms. For 1-2 queries the loop is as fast
    or faster, so they keep it. The global is restored on exit (not thread-safe: FAISS has one).

    Args:
        n_queries: queries of the search(es) in the block.
    """
    import faiss

    before = faiss.cvar.distance_compute_blas_threshold
    if n_queries >= BLAS_MIN_QUERIES:
        faiss.cvar.distance_compute_blas_threshold = 0
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = before


def configure_runtime(*, threads: int | None = None, allocator: str | None = None) -> dict[str, Any]:
    """Applies the allocator settings and thread counts for steady-state CPU inference and training.

    Call once at start-up, before the first large tensor (the CLI does so in ``main``). Idempotent:
    a second call with the same request returns the first call's record without touching anything.
    glibc settings cannot be taken back within a process: a later ``system`` request reports them
    as ``still_in_force``.

    Args:
        threads: intra-op threads; default ``SLICE2VOL_THREADS``, else ``OMP_NUM_THREADS``, else the
            cores this process may use (:func:`available_cpus`).
        allocator: see :func:`parse_allocator`; default ``SLICE2VOL_ALLOCATOR``, else ``auto`` (the
            project's glibc settings unless jemalloc/tcmalloc is preloaded).

    Returns:
        What was set, for provenance: ``allocator``, ``glibc`` (mallopt values applied),
        ``large_blocks_on_heap`` (checked with one untouched allocation of at most 256 MiB), ``refused``
        (values glibc would not take), ``threads``, ``threads_source``, ``cpus``.

    Raises:
        ValueError: a malformed ``allocator`` / ``SLICE2VOL_ALLOCATOR`` / thread count.
    """
    allocator_source = "argument" if allocator is not None else (
        ALLOCATOR_ENV if os.environ.get(ALLOCATOR_ENV) else "default")
    spec = parse_allocator(allocator if allocator is not None else os.environ.get(ALLOCATOR_ENV))
    count, threads_source = resolve_threads(threads)
    key = (spec, count)
    if _state.get("key") == key:
        return dict(_state["record"])
    record: dict[str, Any] = {"requested_allocator": spec.kind, "allocator_source": allocator_source}
    record.update(_configure_allocator(spec))
    record.update(threads=count, threads_source=threads_source, cpus=available_cpus())
    record["libraries"] = _configure_threads(count)
    _state.update(key=key, record=record)
    log.debug("runtime: %s", record)
    return dict(record)


def runtime_record() -> dict[str, Any]:
    """What :func:`configure_runtime` set in this process (empty if it was not called)."""
    return dict(_state.get("record", {}))


def checked_device(device: str | None, source: str = "--device") -> str:
    """``auto``/``None`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else checked.

    Args:
        source: where the name came from, for the message: the flag, or a config key
            (``train.device``) when the config file chose it.

    Raises:
        ValueError: not a device name, or a CUDA device this machine does not have (one line; torch's
            own errors come later, as tracebacks from deep inside the job).
    """
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    fix = f"use {source} cpu or auto" if source.startswith("-") else f"set {source} to cpu or auto"
    try:
        dev = torch.device(device)
    except RuntimeError:
        names = "auto, cpu, cuda or cuda:N"
        raise ValueError(f"{source} {device!r} is not a device: "
                         + (f"use {names}" if source.startswith("-") else f"set {source} to {names}")) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{source} {device}: no CUDA device is available here (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda or 'none'}); {fix}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{source} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
