"""Runtime configuration: allocator specs, the page faults they remove, thread and worker budgets, the CLI hook.

Allocator settings are per process, so their effect is measured in fresh child processes.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from slice2vol import runtime
from slice2vol.runtime import (
    AllocatorSpec,
    GLIBC_DEFAULTS,
    loader_workers,
    parse_allocator,
    parse_size,
    resolve_threads,
)

REPO = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    """Each test sees an unconfigured process state and no allocator/thread variables of the caller."""
    monkeypatch.setattr(runtime, "_state", {})
    for var in (runtime.ALLOCATOR_ENV, runtime.THREADS_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "OPENBLAS_NUM_THREADS", "LOKY_MAX_CPU_COUNT"):
        monkeypatch.delenv(var, raising=False)


# -- parsing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [("0", 0), ("4096", 4096), ("64K", 64 << 10), ("32M", 32 << 20),
                                           ("1G", 1 << 30), ("512mb", 512 << 20), ("2GiB", 2 << 30)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("spec,kind,settings", [
    (None, "auto", GLIBC_DEFAULTS),
    ("auto", "auto", GLIBC_DEFAULTS),
    ("glibc", "glibc", GLIBC_DEFAULTS),
    ("system", "system", {}),
    ("off", "system", {}),
    ("default", "system", {}),
    ("jemalloc", "jemalloc", {}),
    ("glibc:trim_threshold=1G", "glibc", {"trim_threshold": 1 << 30}),  # options replace the defaults
    ("glibc:mmap_threshold=32M,top_pad=64M,arena_max=2", "glibc",
     {"mmap_threshold": 32 << 20, "top_pad": 64 << 20, "arena_max": 2}),
])
def test_parse_allocator(spec, kind, settings):
    parsed = parse_allocator(spec)
    assert parsed.kind == kind and dict(parsed.glibc) == settings


@pytest.mark.parametrize("spec,message", [
    ("tcmallocc", "unknown allocator 'tcmallocc'"),
    ("glibc:mmap=1G", "bad glibc option 'mmap=1G'"),
    ("glibc:trim_threshold", "bad glibc option"),
    ("glibc:trim_threshold=lots", "not a size: 'lots'"),
    ("glibc:mmap_threshold=4G", "outside mallopt's range"),
    ("system:trim_threshold=1G", "options are only for glibc"),
])
def test_bad_allocator_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_allocator(spec)


# -- the effect: page faults of a repeated large allocation, in fresh processes ---------------------
CHILD = textwrap.dedent("""
    import json, resource, sys
    from slice2vol.runtime import configure_runtime
    record = configure_runtime(allocator=sys.argv[1], threads=1)
    import numpy as np
    x = np.ones(12 << 20, dtype=np.float32)  # 48 MiB: above glibc's largest dynamic mmap threshold (32 MiB)
    faults = []
    for _ in range(8):  # the allocation pattern of a forward pass: new outputs, inputs freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = x * 2; b = a + 1; del a
        c = np.concatenate([b[: 6 << 20], b[6 << 20:]]); del b
        d = np.maximum(c, 0); del c
        float(d.sum()); del d
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"record": record, "faults": faults}))
""")


def _child(allocator: str, env: dict | None = None) -> dict:
    # 4 KiB pages, so faults count pages (numpy would ask for transparent huge pages)
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "NUMPY_MADVISE_HUGEPAGE": "0", **(env or {})}
    full_env.pop(runtime.ALLOCATOR_ENV, None)
    out = subprocess.run([sys.executable, "-c", CHILD, allocator], env=full_env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt settings are glibc's")
def test_project_allocator_removes_the_page_faults_of_reused_buffers():
    """glibc defaults map and unmap every 48 MiB buffer (12k faults each); ours reuses the heap.

    Both thresholds are needed: with only the mmap threshold raised the heap top is trimmed after
    each free; with only the trim threshold raised the buffers are still mmapped.
    """
    pages = (48 << 20) // 4096  # per buffer; a step makes 4 of them
    default = _child("system")
    assert default["record"]["allocator"] == "system defaults"
    assert min(default["faults"][2:]) > 3.5 * pages
    ours = _child("auto")
    assert ours["record"]["allocator"] == "glibc" and ours["record"]["glibc"] == GLIBC_DEFAULTS
    assert ours["record"]["large_blocks_on_heap"] is True
    assert max(ours["faults"][3:]) < 0.02 * pages  # the first steps grow the heap, then no new page
    for partial in ("glibc:mmap_threshold=1G", "glibc:trim_threshold=1G"):
        assert min(_child(partial)["faults"][3:]) > 2 * pages, partial


def test_settings_take_no_effect_twice_and_system_reports_what_stays(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "_apply_glibc", lambda libc, settings: calls.append(settings) or {"glibc": settings})
    monkeypatch.setattr(runtime, "_libc", lambda: object())
    monkeypatch.setattr(runtime, "loaded_allocator", lambda: None)
    first = runtime.configure_runtime(threads=1)
    assert runtime.configure_runtime(threads=1) == first and len(calls) == 1
    assert runtime.runtime_record() == first
    later = runtime.configure_runtime(threads=1, allocator="system")
    assert later["allocator"] == "system defaults" and later["still_in_force"] == GLIBC_DEFAULTS


class _FakeLibc:
    """mallopt that refuses thresholds above 32 MiB, as glibc before 2.35 does."""

    class _Mallopt:
        argtypes = None

        def __call__(self, param, value):
            return int(not (param == runtime.M_MMAP_THRESHOLD and value > 32 << 20))

    mallopt = _Mallopt()


def test_an_old_glibc_cap_is_reported(caplog):
    libc = _FakeLibc()
    out = runtime._apply_glibc(libc, dict(GLIBC_DEFAULTS))
    assert out["glibc"] == {"trim_threshold": 1 << 30, "mmap_threshold": 32 << 20}
    assert out["refused"] == {"mmap_threshold": 1 << 30}
    assert "large_blocks_on_heap" not in out  # the fake has no mallinfo2: unknown, not claimed
    assert "preload jemalloc or tcmalloc" in caplog.text


def test_preloaded_allocator_is_left_alone_and_a_missing_one_falls_back(monkeypatch, caplog):
    applied = []
    monkeypatch.setattr(runtime, "_apply_glibc", lambda libc, settings: applied.append(settings) or {"glibc": settings})
    monkeypatch.setattr(runtime, "_libc", lambda: object())
    monkeypatch.setattr(runtime, "loaded_allocator", lambda: "jemalloc")
    assert runtime._configure_allocator(AllocatorSpec("auto", tuple(GLIBC_DEFAULTS.items()))) == \
        {"allocator": "jemalloc", "preloaded": True}
    assert not applied
    monkeypatch.setattr(runtime, "loaded_allocator", lambda: None)
    monkeypatch.setattr(runtime, "find_allocator_library", lambda name: None)
    out = runtime._configure_allocator(parse_allocator("tcmalloc"))
    assert out["allocator"] == "glibc" and applied == [GLIBC_DEFAULTS]
    assert "tcmalloc is not loaded" in caplog.text and "LD_PRELOAD" in caplog.text


# -- threads and workers ----------------------------------------------------------------------------
def test_thread_count_precedence(monkeypatch):
    monkeypatch.setattr(runtime, "available_cpus", lambda: 6)
    assert resolve_threads() == (6, "available cores")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads() == (3, "OMP_NUM_THREADS")
    monkeypatch.setenv(runtime.THREADS_ENV, "2")
    assert resolve_threads() == (2, runtime.THREADS_ENV)
    assert resolve_threads(5) == (5, "argument")
    monkeypatch.setenv(runtime.THREADS_ENV, "many")
    with pytest.raises(ValueError, match="SLICE2VOL_THREADS='many': expected a positive integer"):
        resolve_threads()
    with pytest.raises(ValueError, match="expected a positive integer"):
        resolve_threads(0)


def test_variables_we_set_are_not_mistaken_for_the_users(monkeypatch):
    monkeypatch.setattr(runtime, "available_cpus", lambda: 4)
    monkeypatch.setattr(runtime, "_configure_allocator", lambda spec: {"allocator": "test"})
    assert runtime.configure_runtime()["threads"] == 4
    assert os.environ["OMP_NUM_THREADS"] == "4" and os.environ["MKL_NUM_THREADS"] == "4"
    assert runtime.configure_runtime(threads=2)["threads"] == 2
    assert os.environ["OMP_NUM_THREADS"] == "2"  # ours: updated
    assert resolve_threads() == (4, "available cores")  # not "OMP_NUM_THREADS"


def test_user_thread_variables_are_kept(monkeypatch):
    monkeypatch.setattr(runtime, "_configure_allocator", lambda spec: {"allocator": "test"})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    record = runtime.configure_runtime()
    assert record["threads"] == 1 and record["threads_source"] == "OMP_NUM_THREADS"
    assert runtime.configure_runtime(threads=3)["threads"] == 3  # an explicit argument wins in-process...
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["MKL_NUM_THREADS"] == "3"  # ...not over the user's


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and at least 2 cores")
def test_threads_follow_the_cpu_affinity_of_the_process():
    code = textwrap.dedent("""
        import json, os
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        from slice2vol.runtime import configure_runtime
        import torch
        record = configure_runtime(allocator="system")
        print(json.dumps([record["threads"], record["cpus"], torch.get_num_threads()]))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", runtime.THREADS_ENV)}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [1, 1, 1]


@pytest.mark.parametrize("requested,threads,expected", [
    (None, 8, 7), (2, 8, 2), (16, 8, 7), (1, 2, 1), (4, 2, 1), (1, 1, 0), (None, 1, 0), (0, 8, 0)])
def test_loader_workers_leave_a_core_to_the_main_process(requested, threads, expected):
    assert loader_workers(requested, threads) == expected


# -- the CLI --------------------------------------------------------------------------------------
def test_cli_configures_the_runtime_and_refuses_a_bad_allocator(monkeypatch, tmp_path, capsys):
    from slice2vol.cli import main

    monkeypatch.setattr(runtime, "_configure_allocator", lambda spec: {"allocator": f"test:{spec.kind}"})
    main(["index", "info", str(tmp_path)])  # fails (no index there) after configuring
    assert runtime.runtime_record()["allocator"] == "test:auto"
    capsys.readouterr()
    monkeypatch.setenv(runtime.ALLOCATOR_ENV, "glibc:mmap=1G")
    assert main(["index", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "SLICE2VOL_ALLOCATOR: bad glibc option 'mmap=1G'" in err


# -- the benchmark's variants -------------------------------------------------------------------------
def _bench_encoders():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_encoders", REPO / "scripts" / "bench_encoders.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_variants_differ_only_in_allocator_settings_and_folding(monkeypatch):
    bench = _bench_encoders()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the caller's allocator settings must not leak into A or B
    monkeypatch.setenv(runtime.ALLOCATOR_ENV, "glibc")
    default, allocator, project, env16g = (bench.variant_env(v) for v in ("default", "allocator", "project", "env16g"))
    for env in (default, allocator, project, env16g):
        assert "MALLOC_ARENA_MAX" not in env and str(REPO) in env["PYTHONPATH"].split(os.pathsep)
    assert default[runtime.ALLOCATOR_ENV] == "system" and runtime.ALLOCATOR_ENV not in project
    assert allocator == project and bench.variant_env("default+fold") == default  # folding is not an env setting
    assert [bench.split_variant(v) for v in ("default", "allocator", "project", "default+fold", "glibc:top_pad=1G",
                                             "plain", "project+nchw", "default+nchw+fold")] == [
        ("default", False, False), ("allocator", False, False), ("allocator", True, False), ("default", True, False),
        ("glibc:top_pad=1G", False, False), ("default", False, True), ("allocator", True, True),
        ("default", True, True)]
    assert bench.variant_env("plain") == default  # the memory format is not an env setting either
    with pytest.raises(ValueError, match="unknown suffix"):
        bench.split_variant("project+fp16")
    assert env16g["MALLOC_MMAP_THRESHOLD_"] == str(16 << 30) and env16g[runtime.ALLOCATOR_ENV] == "system"
    assert bench.variant_env("glibc:top_pad=64M")[runtime.ALLOCATOR_ENV] == "glibc:top_pad=64M"
    monkeypatch.setattr(runtime, "find_allocator_library", lambda name: None)
    assert bench.variant_env("preload:jemalloc") is None  # not installed: skipped, not run as glibc
    with pytest.raises(ValueError, match="unknown allocator"):
        bench.variant_env("glibcc")


def test_bench_summary_speedups_are_against_the_first_variant():
    bench = _bench_encoders()
    run = dict(encoder="e", input=[8, 8], batch=4, flops=2e9, timed_sys_s=0.5, timed_user_s=1.5, timed_minflt=100,
               child_sys_s=1, child_user_s=2, child_minflt=10, runtime={"allocator": "x"}, torch_threads=2)
    results = [{**run, "variant": "default", "slices_per_s": 10.0, "rates": [10.0, 10.0]},
               {**run, "variant": "project", "slices_per_s": 25.0, "rates": [25.0, 25.0], "timed_sys_s": 0.0},
               {**run, "variant": "default", "slices_per_s": 12.0, "rates": [12.0, 12.0]},
               {**run, "variant": "project", "slices_per_s": 35.0, "rates": [35.0, 35.0], "timed_sys_s": 0.0}]
    rows = bench.summarise(results, ["default", "project"], ceiling=100.0)
    default, project = rows
    assert default["slices_per_s"] == 11.0 and project["slices_per_s"] == 30.0  # medians over rounds
    assert project["speedup"] == pytest.approx(30 / 11) and default["speedup"] == 1.0
    assert default["cpu_ms_per_slice"] == pytest.approx(1000 * 2.0 / 8) and project["cpu_speedup"] == pytest.approx(4 / 3)
    assert project["of_ceiling"] == pytest.approx(30 * 2 / 100) and project["minflt_per_batch"] == 50


def test_faiss_blas_for_batches_only_and_restores_the_threshold():
    faiss = pytest.importorskip("faiss")
    before = faiss.cvar.distance_compute_blas_threshold
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3000, 64)).astype("float32")
    queries = rng.standard_normal((40, 64)).astype("float32")
    index = faiss.IndexFlatIP(64)
    index.add(base)
    with runtime.faiss_blas_for(len(queries)):
        assert faiss.cvar.distance_compute_blas_threshold == 0
        sims, ids = index.search(queries, 5)
    assert faiss.cvar.distance_compute_blas_threshold == before
    with runtime.faiss_blas_for(runtime.BLAS_MIN_QUERIES - 1):  # one or two queries keep FAISS's own choice
        assert faiss.cvar.distance_compute_blas_threshold == before
    with pytest.raises(RuntimeError), runtime.faiss_blas_for(10):
        raise RuntimeError("restored on errors too")
    assert faiss.cvar.distance_compute_blas_threshold == before
    # same neighbours as a plain numpy product (independent reference)
    reference = np.argsort(-(queries @ base.T), axis=1)[:, :5]
    np.testing.assert_array_equal(ids, reference)
    np.testing.assert_allclose(sims, np.take_along_axis(queries @ base.T, reference, 1), rtol=1e-5, atol=1e-4)


# -- handing free heap pages back before a fork -----------------------------------------------------
FORK_CHILD = textwrap.dedent("""
    import json, os, sys, time
    from slice2vol.runtime import configure_runtime, release_free_heap
    configure_runtime(allocator="auto", threads=1)
    import numpy as np

    def kb(field, path="/proc/self/smaps_rollup"):
        for line in open(path):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    x = np.ones(40 << 20, dtype=np.float32)  # 160 MiB written on the heap, then freed (kept for reuse)
    del x
    out = {"rss_freed": kb("Rss")}
    if sys.argv[1] == "release":
        out["released"] = release_free_heap()
    out["rss_before_fork"] = kb("Rss")
    pid = os.fork()
    if pid == 0:  # a DataLoader worker: sleeps while the parent looks at what it shares with it
        time.sleep(3)
        os._exit(0)
    time.sleep(0.5)
    out["shared_dirty"] = kb("Shared_Dirty")
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    print(json.dumps(out))
""")


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
@pytest.mark.parametrize("mode", ["keep", "release"])
def test_released_heap_pages_are_not_shared_with_a_forked_worker(mode):
    """Freed buffers stay mapped (the allocator settings); after a fork they are shared copy-on-write
    with the child unless release_free_heap handed them back first."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NUMPY_MADVISE_HUGEPAGE": "0"}
    env.pop(runtime.ALLOCATOR_ENV, None)
    out = subprocess.run([sys.executable, "-c", FORK_CHILD, mode], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    buffer_kb = 160 << 10
    if mode == "keep":
        assert r["rss_before_fork"] > r["rss_freed"] - 1024  # nothing handed back
        assert r["shared_dirty"] > 0.9 * buffer_kb  # the whole freed buffer is now copy-on-write
    else:
        assert r["released"] is True
        assert r["rss_before_fork"] < r["rss_freed"] - 0.9 * buffer_kb
        assert r["shared_dirty"] < 0.5 * buffer_kb


def test_release_free_heap_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(runtime, "_libc", lambda: None)
    assert runtime.release_free_heap() is False
    monkeypatch.setattr(runtime, "loaded_allocator", lambda: "jemalloc")
    assert runtime.release_free_heap() is False


def test_one_intra_op_thread_holds_when_another_thread_changes_its_count_later():
    """A reader thread given one intra-op thread kept it only until its first parallel call if the
    encoding thread had set its own count meanwhile (torch's lazy per-thread start); seen as a reader
    stamped with 2 threads in test_extract about one run in ten."""
    import threading

    import torch

    from slice2vol.runtime import one_intra_op_thread, torch_threads

    ready, go, seen = threading.Event(), threading.Event(), {}

    def reader():
        one_intra_op_thread()
        ready.set()
        go.wait()
        seen["threads"] = torch.get_num_threads()

    with torch_threads(2):
        thread = threading.Thread(target=reader)
        thread.start()
        ready.wait()
        with torch_threads(1):  # what the caching job does around its first volume
            pass
        go.set()
        thread.join()
        assert torch.get_num_threads() == 2
    assert seen["threads"] == 1


def test_device_names_are_checked_in_one_line(monkeypatch):
    """--device cuda on a machine without a GPU, or a typo, ended in torch tracebacks from deep inside
    the job (the caching job, bench, pretraining)."""
    import torch

    from slice2vol.runtime import checked_device

    with pytest.raises(ValueError, match=r"--device 'bogus' is not a device: use auto, cpu, cuda or cuda:N"):
        checked_device("bogus")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert checked_device("auto") == "cpu" and checked_device("cpu") == "cpu"
    with pytest.raises(ValueError, match=r"--device cuda:1: no CUDA device is available here"):
        checked_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert checked_device("cuda:0") == "cuda:0" and checked_device("auto") == "cuda"
    with pytest.raises(ValueError, match=r"--device cuda:3: this machine has 1 CUDA device\(s\)"):
        checked_device("cuda:3")
    # a config file's device is blamed on its key, not on a flag the user never gave
    with pytest.raises(ValueError, match=r"^train.device 'gpu0' is not a device: set train.device to auto, cpu"):
        checked_device("gpu0", "train.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device cuda: no CUDA device .*; set device to cpu or auto$"):
        checked_device("cuda", "device")
