"""normext's CPU output cache (csrc/common/cpu_output_allocator.cpp): placement
within a page, reuse and eviction, its size setting and default, its counts,
threads, fork, memory pressure, the profiler's view and the switch benchmarks
use. Tests that need their own cache size or process run in a subprocess."""

import gc
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import normext
from normext import ops
from normext._extension import cpu_cache_disabled

MiB = 1 << 20

# The default cap before the 1/8-of-memory bound: see "CPU output cache: default
# cap" in benchmarks/RESULTS.md.
DEFAULT_CAP_MB = 1280

# The tests that run in pytest's process need the cache on.
requires_cache = pytest.mark.skipif(os.environ.get("NORMEXT_CPU_CACHE_MB") == "0",
                                    reason="the CPU output cache is off")


def _copy(x):
    """A batch-norm output (from the cache when 1 MiB or more) equal to x."""
    return ops.batch_norm_elemt(x, None, None, torch.zeros(x.shape[1]), torch.ones(x.shape[1]))


_PRELUDE = """\
import torch, normext
torch.set_num_threads(1)
def copy(x):
    return normext.ops.batch_norm_elemt(x, None, None, torch.zeros(1), torch.ones(1))
"""


def _at_page_offset(t, offset):
    """A copy of t whose data starts `offset` bytes into a 4 KiB page."""
    buffer = torch.empty(t.numel() + 4096 // t.element_size(), dtype=t.dtype)
    skip = (offset - buffer.data_ptr()) % 4096 // t.element_size()
    return buffer[skip:skip + t.numel()].view(t.shape).copy_(t)


def _page_distance(a, b):
    d = (a.data_ptr() - b.data_ptr()) % 4096
    return min(d, 4096 - d)


@requires_cache
@pytest.mark.parametrize("offset", [0, 64, 2048, 4032])
def test_cpu_outputs_sit_apart_from_inputs_within_a_page(offset):
    """Cached CPU outputs (1 MiB and up) start half a page away from the input
    they are computed from: an output 64 bytes ahead of its input modulo 4 KiB
    made the elementwise passes 10-25% slower (4K aliasing). The offset data
    pointer must not change any value, nor what the cache frees."""
    x = _at_page_offset(torch.randn(16, 64, 16, 16, dtype=torch.float64).float(), offset)
    dy = _at_page_offset(torch.randn(x.shape), (offset + 1024) % 4096)
    w, b = torch.rand(64) + 0.5, torch.randn(64)
    y, mean, invstd = ops.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5)
    assert _page_distance(y, x) == 2048
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, w, b, True))
    sum_dy, sum_dy_xmu, _, _ = ops.batch_norm_backward_reduce(dy, x, mean, invstd, w)
    dx = ops.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, x.numel() / 64)
    assert min(_page_distance(dx, x), _page_distance(dx, dy)) >= 1024
    xr = x.detach().requires_grad_()
    ref = torch.nn.functional.batch_norm(xr, None, None, w, b, True)
    torch.testing.assert_close(dx, torch.autograd.grad(ref, xr, dy)[0])
    del y, dx
    assert normext.cached_cpu_bytes() > 0
    assert normext.release_cpu_cache() > 0 and normext.cached_cpu_bytes() == 0


@requires_cache
def test_cpu_output_cache_reuses_the_block_freed_last():
    """Of several cached blocks of one size, an output takes the one freed
    last, which is the likeliest to be in cache still: handing out the oldest
    rotated a loop's output through every block of its size (2.2x as long)."""
    normext.release_cpu_cache()
    x = torch.randn(8, 32, 32, 32)
    w, b = torch.rand(32) + 0.5, torch.randn(32)
    mean, var = ops.batch_norm_moments(x)
    invstd = torch.rsqrt(var + 1e-5)
    first, second, third = (ops.batch_norm_elemt(x, w, b, mean, invstd) for _ in range(3))
    addresses = [y.data_ptr() for y in (first, second, third)]
    assert len(set(addresses)) == 3
    del first, second, third  # the third block is freed last
    for _ in range(3):
        y = ops.batch_norm_elemt(x, w, b, mean, invstd)
        assert y.data_ptr() == addresses[2]
        torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, w, b, True,
                                                                     eps=1e-5))
        del y
    assert normext.release_cpu_cache() > 0


def _run_python(code, cache_mb=None):
    """`code` in a fresh interpreter (the cache reads NORMEXT_CPU_CACHE_MB once
    per process), with `copy(x)`, a batch-norm output equal to x; returns its
    stdout and stderr."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")])))
    env.pop("NORMEXT_CPU_CACHE_MB", None)
    if cache_mb is not None:
        env["NORMEXT_CPU_CACHE_MB"] = cache_mb
    result = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(code)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout, result.stderr


def test_cpu_output_cache_evicts_the_blocks_freed_longest_ago():
    """A full cache makes room for a freed block by unmapping the oldest ones,
    so a loop's current shape is cached even after other shapes filled it."""
    out, _ = _run_python("""
        inputs = {mib: torch.randn(1, 1, mib << 18) for mib in (2, 3, 4, 5, 6)}
        def output(mib):  # a float32 batch_norm_elemt output of `mib` MiB
            # (one input per size: an output's offset in its block follows the input's)
            return copy(inputs[mib])
        outputs = [output(mib) for mib in (2, 3, 4, 5)]
        while outputs:
            del outputs[0]  # freed oldest first
            print(0, normext.cached_cpu_bytes() >> 20)
        for _ in range(3):
            y = output(6)
            address = y.data_ptr()
            del y
            print(address, normext.cached_cpu_bytes() >> 20)
        """, cache_mb="8")
    rows = [line.split() for line in out.splitlines()]
    # 8 MiB cap: 2; 2+3; 4 evicts 2; 5 evicts 3 and 4; 6 evicts 5, then is reused
    assert [int(row[1]) for row in rows] == [2, 5, 7, 5, 6, 6, 6]
    assert rows[-1][0] == rows[-2][0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_cpu_output_cache_forks_while_threads_allocate():
    """A smoke test: forks while other threads take and return cached blocks,
    and each child, its cache empty, allocates from it. (The lock is held across fork, so
    a child cannot inherit it locked by a thread it does not have; the lock is
    held too briefly for 50 forks to catch a build without that: the audit's
    reproducer needed about 2000 forks per hang.)"""
    out, _ = _run_python("""
        import os, threading
        x = torch.randn(1, 1, 1 << 18)  # 1 MiB outputs: cached
        stop = False
        def allocate():
            while not stop:
                copy(x)
        threads = [threading.Thread(target=allocate) for _ in range(2)]
        for thread in threads:
            thread.start()
        codes = []
        for _ in range(50):
            pid = os.fork()
            if pid == 0:
                empty = normext.cpu_cache_info()["cached_bytes"] == 0
                os._exit(0 if empty and torch.equal(copy(x), x) else 1)
            codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        stop = True
        for thread in threads:
            thread.join()
        print(codes.count(0))
        """)
    assert out.split() == ["50"]


def _mapping_of(address):
    """The start of the mapping holding `address` and its VmFlags, from /proc/self/smaps."""
    start = flags = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(part, 16) for part in head.split("-"))
                start = low if low <= address < high else None
            elif head == "VmFlags:" and start is not None:
                flags = line.split()[1:]
                break
    return start, flags


@requires_cache
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps")
                    or not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                    reason="needs Linux /proc and transparent huge pages")
def test_cpu_output_cache_maps_2mib_aligned_blocks_advised_for_huge_pages():
    """Cached blocks are mappings of their own, 2 MiB-aligned and advised for
    transparent huge pages (eval forward over the LLC ran 1.1-1.3x faster)."""
    x = torch.randn(8, 64, 64, 64)
    w, b = torch.rand(64) + 0.5, torch.randn(64)
    mean, var = ops.batch_norm_moments(x)
    y = ops.batch_norm_elemt(x, w, b, mean, torch.rsqrt(var + 1e-5))
    # The block starts at the page holding the output's first byte (the
    # output sits less than a page into its block); the kernel may merge the
    # mapping with a neighbour, so only its flags are checked.
    assert (y.data_ptr() & ~4095) % (2 << 20) == 0
    assert "hg" in _mapping_of(y.data_ptr())[1]
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, w, b, True))
    del y
    assert normext.release_cpu_cache() > 0



def test_cpu_output_cache_size_is_read_at_first_use():
    """NORMEXT_CPU_CACHE_MB set after `import normext` but before the first
    large output still counts: 0 turns the cache off."""
    out, _ = _run_python("""
        import os
        os.environ["NORMEXT_CPU_CACHE_MB"] = "0"
        x = torch.randn(1, 1, 1 << 19)  # 2 MiB
        y = copy(x)
        assert torch.equal(y, x)
        del y
        info = normext.cpu_cache_info()
        print(info["enabled"], info["limit_bytes"], info["cached_bytes"], info["in_use_bytes"],
              info["misses"])
        """)
    assert out.split() == ["False", "0", "0", "0", "0"]


def test_cpu_output_cache_size_must_be_a_number():
    """An invalid size warns and leaves the default: the measured need of a
    ResNet-50 training loop, at most 1/8 of physical memory."""
    out, err = _run_python("""
        import os, warnings
        warnings.simplefilter("always")
        os.environ["NORMEXT_CPU_CACHE_MB"] = "-1"
        copy(torch.randn(1, 1, 1 << 19))
        print(normext.cpu_cache_info()["limit_bytes"])
        """)
    eighth_of_ram = os.sysconf("SC_PHYS_PAGES") // 8 * os.sysconf("SC_PAGE_SIZE")
    default = min(DEFAULT_CAP_MB * MiB, eighth_of_ram)
    assert int(out) == default
    assert (f'NORMEXT_CPU_CACHE_MB="-1" is not a number of megabytes; using the default, '
            f'{default >> 20} MB') in err


@requires_cache
def test_cpu_cache_info_counts_hits_misses_bytes_and_evictions():
    gc.collect()
    normext.release_cpu_cache()
    x = torch.randn(1, 1, 3 << 18)  # 3 MiB
    before = normext.cpu_cache_info()
    assert set(before) == {"cached_bytes", "in_use_bytes", "limit_bytes", "hits", "misses",
                           "evictions", "enabled"}
    assert before["cached_bytes"] == 0 and before["enabled"] and before["limit_bytes"] >= 3 * MiB

    def change():
        now = normext.cpu_cache_info()
        return {key: now[key] - before[key] for key in ("cached_bytes", "in_use_bytes", "hits",
                                                         "misses", "evictions")}

    y = _copy(x)
    assert change() == {"cached_bytes": 0, "in_use_bytes": 3 * MiB, "hits": 0, "misses": 1,
                        "evictions": 0}
    del y
    assert change() == {"cached_bytes": 3 * MiB, "in_use_bytes": 0, "hits": 0, "misses": 1,
                        "evictions": 0}
    assert normext.cached_cpu_bytes() == 3 * MiB
    y = _copy(x)
    assert torch.equal(y, x)
    assert change() == {"cached_bytes": 0, "in_use_bytes": 3 * MiB, "hits": 1, "misses": 1,
                        "evictions": 0}
    del y
    assert normext.release_cpu_cache() == 3 * MiB
    assert change() == {"cached_bytes": 0, "in_use_bytes": 0, "hits": 1, "misses": 1,
                        "evictions": 1}
    small = _copy(torch.randn(1, 1, 1000))  # under 1 MiB: torch's allocator, not counted
    assert change()["misses"] == 1 and small.numel() == 1000


@requires_cache
def test_cpu_cache_disabled_gives_outputs_from_torchs_allocator():
    """The switch the benchmarks' "kernels alone" rows use: no block is taken
    or returned while it is off, and the cached blocks wait for it."""
    gc.collect()
    normext.release_cpu_cache()
    x = torch.randn(1, 1, 2 << 18)
    _copy(x)  # a 2 MiB block, cached as it is freed
    before = normext.cpu_cache_info()
    with cpu_cache_disabled():
        with cpu_cache_disabled():
            pass
        y = _copy(x)  # still off after the nested exit
        assert torch.equal(y, x)
        during = normext.cpu_cache_info()
        del y
        after_free = normext.cpu_cache_info()
    assert not during["enabled"] and normext.cpu_cache_info()["enabled"]
    for info in (during, after_free):
        assert {key: info[key] for key in before if key != "enabled"} == \
            {key: before[key] for key in before if key != "enabled"}
    y = _copy(x)
    assert normext.cpu_cache_info()["hits"] == before["hits"] + 1
    del y


@requires_cache
def test_cpu_output_cache_serves_threads():
    """Threads taking and returning blocks of a few sizes at once: every output
    is right and the counts add up."""
    gc.collect()
    inputs = [torch.randn(1, 1, mib << 18) for mib in (1, 2, 3)]
    before = normext.cpu_cache_info()
    wrong = []

    def work():
        for i in range(30):
            x = inputs[i % 3]
            if not torch.equal(_copy(x), x):
                wrong.append(i)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = normext.cpu_cache_info()
    assert wrong == []
    assert after["hits"] + after["misses"] - before["hits"] - before["misses"] == 120
    assert after["hits"] - before["hits"] >= 120 - 12  # at most one block per size per thread
    assert after["in_use_bytes"] == before["in_use_bytes"]
    assert after["cached_bytes"] <= after["limit_bytes"]


@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.exists("/proc/self/maps"),
                    reason="needs os.fork and /proc")
def test_forked_child_starts_with_an_empty_cache_and_reads_tensors_in_use():
    """A child (a DataLoader worker, say) gets no copy of the cached blocks, nor
    their records or counts; a tensor the parent holds, in a block handed out
    again from the cache, is the child's to read."""
    out, _ = _run_python("""
        import os, sys
        def mapped(address):
            with open("/proc/self/maps") as maps:
                for line in maps:
                    low, high = (int(part, 16) for part in line.split()[0].split("-"))
                    if low <= address < high:
                        return True
            return False
        x = torch.randn(1, 1, 2 << 18)  # 2 MiB
        copy(x)  # cached as it is freed
        held = copy(x)  # from the cache: in use again
        spare = copy(x)
        spare_address = spare.data_ptr()
        del spare  # cached
        parent = normext.cpu_cache_info()
        assert (parent["hits"], parent["cached_bytes"], parent["in_use_bytes"]) == (1, 2 << 20,
                                                                                   2 << 20)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            child = normext.cpu_cache_info()
            checks = {
                "cached block not copied": not mapped(spare_address),
                "nothing cached": child["cached_bytes"] == 0,
                "counts reset": (child["hits"], child["misses"], child["evictions"]) == (0, 0, 0),
                "held in use": child["in_use_bytes"] == 2 << 20,
                "held readable": torch.equal(held, x),
            }
            y = copy(x)
            checks["new output"] = torch.equal(y, x) and normext.cpu_cache_info()["misses"] == 1
            del y, held
            checks["both cached"] = normext.cpu_cache_info()["cached_bytes"] == 4 << 20
            y = copy(x)
            checks["reused"] = torch.equal(y, x) and normext.cpu_cache_info()["hits"] == 1
            print("child", *sorted(name for name, ok in checks.items() if not ok), flush=True)
            os._exit(0)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        after = normext.cpu_cache_info()
        print("parent", status, mapped(spare_address), torch.equal(held, x),
              after["cached_bytes"] == 2 << 20)
        """)
    assert out.splitlines() == ["child", "parent 0 True True True"]


def test_failed_mapping_releases_the_cache_and_retries():
    """Under an address-space limit a mapping that fits only once the cached
    blocks are unmapped succeeds; one that never fits raises torch's
    OutOfMemoryError, having emptied the cache."""
    out, _ = _run_python("""
        import resource
        small = torch.randn(1, 1, 16 << 18)  # 16 MiB
        big = torch.randn(1, 1, 48 << 18)  # 48 MiB: no 16 MiB block is large enough
        huge = torch.empty(1, 1, 1 << 28)  # 1 GiB, never touched: fits nowhere below
        outputs = [copy(small) for _ in range(4)]
        del outputs
        assert normext.cpu_cache_info()["cached_bytes"] == 64 << 20
        with open("/proc/self/status") as status:
            vm_bytes = next(int(line.split()[1]) << 10 for line in status
                            if line.startswith("VmSize:"))
        # Room for 40 MiB more: a 48 MiB block needs the cache's 64 MiB.
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm_bytes + (40 << 20), hard))
        y = copy(big)
        info = normext.cpu_cache_info()
        print(torch.equal(y, big), info["cached_bytes"], info["evictions"], info["misses"])
        try:
            copy(huge)
        except torch.OutOfMemoryError as error:
            print(type(error).__name__, str(error).splitlines()[0])
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        """, cache_mb="128")
    lines = out.splitlines()
    assert lines[0].split() == ["True", "0", "4", "5"]
    assert lines[1] == ("OutOfMemoryError normext: out of CPU memory: mapping 1073741824 bytes for "
                        "a batch-norm output failed (Cannot allocate memory) after releasing the "
                        "0 bytes of its CPU output cache")


@requires_cache
def test_profiler_sees_cached_outputs_at_their_data_address(tmp_path):
    """torch.profiler's memory view ties an allocation to the tensor at its
    address: a cached output is reported where its data starts (half a page
    into its block here), when allocated and when freed, from a new block and
    from a reused one."""
    from torch.profiler import ProfilerActivity, profile

    x = _at_page_offset(torch.randn(1, 1, 1 << 18), 0)  # 1 MiB at the start of a page
    addresses = []
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(2):  # the second output reuses the first one's block
            y = _copy(x)
            addresses.append(y.data_ptr())
            del y
    trace_path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace_path))
    events = sorted((event["ts"], event["args"].get("Ev Idx", 0), event["args"]["Addr"],
                     event["args"]["Bytes"])
                    for event in json.loads(trace_path.read_text())["traceEvents"]
                    if event.get("name") == "[memory]")
    nbytes = 1 * MiB
    assert addresses[0] == addresses[1] and addresses[0] % 4096 == 2048
    assert [(address, size) for _, _, address, size in events if abs(size) == nbytes] == \
        [(addresses[0], nbytes), (addresses[0], -nbytes)] * 2
