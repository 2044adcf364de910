"""The memory guard: the limits it reads (faked file readers, so these run anywhere), the
messages it gives, the engine's checks before every large allocation, and real refusals under
an address-space rlimit in a subprocess."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

from convmat import ConvMatError, conv_matrix, conv_transpose_matrix
from convmat.engine import (
    cache_info,
    check_allocation,
    clear_cache,
    conv_geometry,
    get_block_pattern,
    get_pattern,
    lookup,
    memory,
    set_cache_budget,
    store,
    tap_table,
)
from convmat.engine.cache import builds, cache_budget, cached_bytes
from convmat.engine.memory import MemoryLimit, memory_limit, memory_limits, total_memory
from convmat.engine.pattern import build_pattern, plan_pattern

from .memory_helpers import FakeFiles, meminfo, run_snippet, status
from .reference import conv_configs, conv_transpose_configs

GiB, MiB = 2**30, 2**20
CPU = torch.device("cpu")


@pytest.fixture
def fake(monkeypatch):
    """``fake(files, rlimits=..., physical=..., page=...)`` replaces the guard's readers."""

    def install(files, rlimits=None, physical=None, page=4096):
        monkeypatch.setattr(memory, "_read", FakeFiles(files))
        monkeypatch.setattr(memory, "_rlimit", lambda name: (rlimits or {}).get(name))
        monkeypatch.setattr(memory, "_physical", lambda name: (physical or {}).get(name))
        monkeypatch.setattr(memory, "_page_size", lambda: page)

    yield install
    set_cache_budget(None)  # the default is found again from the real limits on next use


@pytest.fixture
def fresh_cache():
    clear_cache()
    yield
    clear_cache()
    set_cache_budget(None)


# -- reading the limits ----------------------------------------------------------------------
def test_meminfo_alone(fake):
    fake({"/proc/meminfo": meminfo(8 * GiB)}, physical={"SC_PHYS_PAGES": 16 * GiB})
    assert memory_limits("cpu") == [MemoryLimit(8 * GiB, "MemAvailable")]
    assert total_memory() == 16 * GiB


def test_cgroup_v2_limit_less_usage_less_dropable_cache(fake):
    d = "/sys/fs/cgroup/ci/job"
    fake(
        {
            "/proc/meminfo": meminfo(8 * GiB),
            "/proc/self/cgroup": "0::/ci/job\n",
            f"{d}/memory.max": "1073741824\n",
            f"{d}/memory.current": "536870912\n",
            f"{d}/memory.stat": "anon 1\ninactive_file 134217728\nactive_file 9\n",
        },
        physical={"SC_PHYS_PAGES": 16 * GiB},
    )
    assert memory_limit("cpu") == MemoryLimit(GiB - 384 * MiB, "cgroup v2 memory.max")
    assert total_memory() == GiB


def test_cgroup_v2_max_is_no_limit(fake):
    fake(
        {
            "/proc/meminfo": meminfo(8 * GiB),
            "/proc/self/cgroup": "0::/\n",
            "/sys/fs/cgroup/memory.max": "max\n",
            "/sys/fs/cgroup/memory.current": "536870912\n",
        }
    )
    assert memory_limits("cpu") == [MemoryLimit(8 * GiB, "MemAvailable")]
    assert total_memory() is None


def test_cgroup_v2_parent_limit_binds(fake):
    fake(
        {
            "/proc/meminfo": meminfo(8 * GiB),
            "/proc/self/cgroup": "0::/ci/job\n",
            "/sys/fs/cgroup/ci/job/memory.max": "max\n",
            "/sys/fs/cgroup/ci/memory.max": str(2 * GiB),
            "/sys/fs/cgroup/ci/memory.current": str(GiB + 5),
        }
    )
    assert memory_limit("cpu") == MemoryLimit(GiB - 5, "cgroup v2 memory.max")
    assert total_memory() == 2 * GiB


def test_cgroup_v1(fake):
    d = "/sys/fs/cgroup/memory/docker/abc"
    fake(
        {
            "/proc/meminfo": meminfo(8 * GiB),
            "/proc/self/cgroup": "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n",
            f"{d}/memory.limit_in_bytes": str(3 * GiB),
            f"{d}/memory.usage_in_bytes": str(GiB),
            f"{d}/memory.stat": "cache 5\ntotal_inactive_file 1048576\n",
            # the root's "no limit", a page-rounded 2**63 - 1
            "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes": str(7 * GiB),
        }
    )
    assert memory_limit("cpu") == MemoryLimit(2 * GiB + MiB, "cgroup v1 memory.limit_in_bytes")
    assert total_memory() == 3 * GiB


def test_cgroup_v1_own_cgroup_mounted_at_the_root(fake):
    """A container without a cgroup namespace: /proc/self/cgroup names a path that does not
    exist under the mount, whose root is the container's own cgroup."""
    fake(
        {
            "/proc/meminfo": meminfo(8 * GiB),
            "/proc/self/cgroup": "4:memory:/docker/abc\n",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes": str(GiB),
            "/sys/fs/cgroup/memory/memory.usage_in_bytes": str(GiB // 4),
        }
    )
    assert memory_limit("cpu") == MemoryLimit(3 * GiB // 4, "cgroup v1 memory.limit_in_bytes")


def test_usage_over_the_limit_leaves_nothing(fake):
    fake(
        {
            "/proc/meminfo": meminfo(8 * GiB),
            "/proc/self/cgroup": "0::/\n",
            "/sys/fs/cgroup/memory.max": str(GiB),
            "/sys/fs/cgroup/memory.current": str(2 * GiB),
        }
    )
    assert memory_limit("cpu") == MemoryLimit(0, "cgroup v2 memory.max")


def test_nothing_readable_means_no_limit_known(fake):
    fake({})
    assert memory_limits("cpu") == []
    assert memory.available_memory("cpu") is None
    assert total_memory() is None
    check_allocation(10**18, CPU, "anything")  # nothing known: nothing to refuse by


def test_sysconf_stands_in_for_meminfo(fake):
    fake({}, physical={"SC_AVPHYS_PAGES": 3 * GiB})
    assert memory_limits("cpu") == [MemoryLimit(3 * GiB, "MemAvailable")]


def test_rlimits_less_the_process_sizes(fake):
    fake(
        {"/proc/meminfo": meminfo(8 * GiB), "/proc/self/status": status(GiB, 512 * MiB)},
        rlimits={"RLIMIT_AS": 3 * GiB, "RLIMIT_DATA": GiB},
        physical={"SC_PHYS_PAGES": 16 * GiB},
    )
    assert sorted(memory_limits("cpu"), key=lambda limit: limit.source) == [
        MemoryLimit(8 * GiB, "MemAvailable"),
        MemoryLimit(2 * GiB, "RLIMIT_AS, ulimit -v"),
        MemoryLimit(512 * MiB, "RLIMIT_DATA, ulimit -d"),
    ]
    assert memory_limit("cpu") == MemoryLimit(512 * MiB, "RLIMIT_DATA, ulimit -d")
    assert total_memory() == GiB


def test_statm_stands_in_for_status(fake):
    # statm: size resident shared text lib data dt, in pages
    fake(
        {"/proc/meminfo": meminfo(8 * GiB), "/proc/self/statm": "262144 100 10 1 0 131072 0\n"},
        rlimits={"RLIMIT_AS": 3 * GiB},
    )
    assert memory_limit("cpu") == MemoryLimit(2 * GiB, "RLIMIT_AS, ulimit -v")


def test_default_budget_is_a_quarter_of_the_memory_found(fake, monkeypatch):
    monkeypatch.delenv("CONVMAT_CACHE_BYTES", raising=False)
    fake(
        {"/proc/self/cgroup": "0::/\n", "/sys/fs/cgroup/memory.max": str(4 * GiB)},
        rlimits={"RLIMIT_AS": 3 * GiB},
        physical={"SC_PHYS_PAGES": 64 * GiB},
    )
    set_cache_budget(None)
    assert cache_budget() == 3 * GiB // 4
    fake({}, physical={"SC_PHYS_PAGES": 64 * GiB})
    set_cache_budget(None)
    assert cache_budget() == 2 * GiB


def test_meta_has_no_limit():
    assert memory_limits("meta") == [] and memory_limit("meta") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_limit_is_free_memory_plus_what_torch_holds_unused():
    (found,) = memory_limits("cuda")
    assert found.source == "CUDA free memory"
    assert found.nbytes >= torch.cuda.mem_get_info()[0]


# -- the refusal -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("files", "rlimits", "source"),
    [
        ({"/proc/meminfo": meminfo(GiB)}, {}, r"MemAvailable"),
        (
            {
                "/proc/meminfo": meminfo(8 * GiB),
                "/proc/self/cgroup": "0::/\n",
                "/sys/fs/cgroup/memory.max": str(2 * GiB),
                "/sys/fs/cgroup/memory.current": str(GiB),
            },
            {},
            r"cgroup v2 memory\.max",
        ),
        (
            {"/proc/meminfo": meminfo(8 * GiB), "/proc/self/status": status(2 * GiB, GiB)},
            {"RLIMIT_AS": 3 * GiB},
            r"RLIMIT_AS, ulimit -v",
        ),
    ],
    ids=["meminfo", "cgroup", "rlimit"],
)
def test_refusal_names_size_limit_and_what_instead(fake, files, rlimits, source):
    fake(files, rlimits=rlimits)
    with pytest.raises(
        ConvMatError,
        match=r"^a dense W of shape \(1, 2\) needs 2,147,483,648 bytes, more than the "
        r"1,073,741,824 bytes available on cpu \(2\.0 GiB > 1\.0 GiB, limit: " + source + r"\); "
        r"use a sparse layout$",
    ):
        check_allocation(2 * GiB, CPU, "a dense W of shape (1, 2)", "use a sparse layout")
    check_allocation(GiB, CPU, "what fits")


def test_small_allocations_are_not_checked(fake):
    fake({"/proc/meminfo": meminfo(0)})
    check_allocation(memory.SMALL - 1, CPU, "a small table")
    with pytest.raises(ConvMatError, match="a table needs"):
        check_allocation(memory.SMALL, CPU, "a table")


def test_cache_entries_are_given_back_before_refusing(fake, fresh_cache):
    # What is free rises as the cache gives back (as the kernel's figures would).
    class Meminfo(FakeFiles):
        def __call__(self, path):
            return meminfo(GiB - cached_bytes()) if path == "/proc/meminfo" else None

    fake({})
    memory._read = Meminfo({})  # undone by the fixture's monkeypatch
    set_cache_budget(4 * GiB)
    cuda = torch.device("cuda")
    store(("held", 1, CPU), "test", object(), 300 * MiB)
    store(("held", 2, CPU), "test", object(), 300 * MiB)
    store(("held", 3, cuda), "test", object(), 300 * MiB)  # on another device: kept
    # 1 GiB - 900 MiB free; 400 MiB asked: one CPU entry (the least recently used) goes.
    check_allocation(400 * MiB, CPU, "a W")
    assert lookup(("held", 1, CPU)) is None and lookup(("held", 2, CPU)) is not None
    assert lookup(("held", 3, cuda)) is not None
    # More than all CPU entries could give back: nothing is dropped, the refusal names sizes.
    with pytest.raises(ConvMatError, match=r"a bigger W needs 1,572,864,000 bytes"):
        check_allocation(1500 * MiB, CPU, "a bigger W")
    assert cache_info()["test"] == {"entries": 2, "bytes": 600 * MiB}


# -- the engine checks before it allocates ---------------------------------------------------
@given(cfg=conv_configs())
def test_plan_counts_exactly(cfg):
    """The per-axis plan gives the exact non-zeros and bytes of the pattern it foretells."""
    geo = _geometry(cfg)
    plan = plan_pattern(geo)
    built = build_pattern(geo, plan)
    assert plan.nnz == built.nnz
    assert plan.pattern_bytes() == built.nbytes()
    W = conv_matrix(cfg.weight(), cfg.input_size, **cfg.matrix_kwargs())
    assert int((W != 0).sum()) <= plan.nnz <= W.numel()


@given(cfg=conv_transpose_configs())
def test_plan_counts_exactly_transposed(cfg):
    geo = _geometry(cfg)
    plan = plan_pattern(geo)
    built = build_pattern(geo, plan)
    assert plan.nnz == built.nnz and plan.pattern_bytes() == built.nbytes()


def _geometry(cfg):
    from convmat.engine import conv_transpose_geometry

    w = cfg.weight()
    kw = cfg.matrix_kwargs()
    make = conv_transpose_geometry if cfg.transposed else conv_geometry
    return make(tuple(w.shape), cfg.input_size, **kw)


def test_pattern_build_is_refused_before_it_allocates(fake, fresh_cache):
    fake({"/proc/meminfo": meminfo(16 * MiB)})
    geo = conv_geometry((16, 16, 3, 3), (64, 64), padding=1)
    before = builds("pattern")
    with pytest.raises(
        ConvMatError,
        match=r"building the index pattern of a W of shape \(65536, 65536\) needs [\d,]+ bytes"
        r".* use convmat\.ConvOperator",
    ):
        get_pattern(geo, CPU)
    assert builds("pattern") == before and cache_info() == {}


def test_sparse_w_counts_its_exact_non_zeros(fake, fresh_cache):
    """A stride-2 transposed convolution reads a quarter of the taps per row: the check counts
    the exact non-zeros (not rows * taps), so a W that fits is built, and one that does not is
    refused."""
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    geo_args = dict(stride=2, padding=1, output_padding=1)
    plan = plan_pattern(conv_transpose_geometry_of(w, (96, 96), geo_args))
    rows = 8 * 192 * 192
    assert plan.nnz < rows * 8 * 9 // 3  # far below the naive bound
    need = plan.nnz * (8 + 16) + plan.build_bytes()  # values + CSR indices + the build
    fake({"/proc/meminfo": meminfo(need - MiB)})
    with pytest.raises(ConvMatError, match=f"a sparse W of shape .* needs {need:,} bytes"):
        conv_transpose_matrix(w, (96, 96), layout=torch.sparse_csr, **geo_args)
    fake({"/proc/meminfo": meminfo(need + MiB)})
    W = conv_transpose_matrix(w, (96, 96), layout=torch.sparse_csr, **geo_args)
    assert W._nnz() == plan.nnz
    x = torch.randn(1, 8, 96, 96, dtype=torch.float64)
    expected = F.conv_transpose2d(x, w, **geo_args).flatten()
    torch.testing.assert_close(W @ x.flatten(), expected, rtol=0, atol=1e-10)


def conv_transpose_geometry_of(w, size, kwargs):
    from convmat.engine import conv_transpose_geometry

    return conv_transpose_geometry(tuple(w.shape), size, **kwargs)


def test_dense_w_refused_before_planning(fake, fresh_cache):
    fake({"/proc/meminfo": meminfo(64 * MiB)})
    before = builds("pattern")
    with pytest.raises(
        ConvMatError,
        match=r"a dense W of shape \(36864, 36864\) and dtype torch\.float32 needs "
        r"5,435,817,984 bytes, more than the 67,108,864 bytes available on cpu .*MemAvailable"
        r".*use layout=torch\.sparse_csr",
    ):
        conv_matrix(torch.ones(4, 4, 3, 3), (96, 96), padding=1)
    assert builds("pattern") == before and cache_info() == {}


def test_block_pattern_and_its_transpose_are_checked(fake, fresh_cache):
    geo = conv_geometry((32, 32, 3, 3), (64, 64), padding=1)
    fake({"/proc/meminfo": meminfo(8 * MiB)})
    with pytest.raises(ConvMatError, match=r"building the block pattern of a W of shape"):
        get_block_pattern(geo, 8, 8, CPU)
    assert "block pattern" not in cache_info()
    # Built with room to spare; its transpose then asks for more than is left.
    memory._read = FakeFiles({"/proc/meminfo": meminfo(GiB)})
    blocks = get_block_pattern(geo, 8, 8, CPU)
    held = cache_info()["block pattern"]["bytes"]
    assert held == blocks.nbytes()
    memory._read = FakeFiles({"/proc/meminfo": meminfo(16 * MiB)})
    with pytest.raises(ConvMatError, match=r"the transpose of a block-sparse W of shape"):
        blocks.transpose()
    memory._read = FakeFiles({"/proc/meminfo": meminfo(GiB)})
    blocks.transpose()
    assert cache_info()["block pattern"]["bytes"] == blocks.nbytes() > held


def test_meta_weight_builds_no_pattern(fresh_cache):
    w = torch.empty(64, 64, 3, 3, device="meta")
    before = builds("pattern"), builds("block pattern"), builds("tap table")
    rows = 64 * 512 * 512
    exact = 64 * 64 * (510 * 3 + 2 * 2) ** 2  # every row reads 3 taps per axis but at the edges
    for layout in (torch.strided, torch.sparse_coo, torch.sparse_csr):
        W = conv_matrix(w, (512, 512), padding=1, layout=layout)
        assert (W.device.type, W.shape, W.layout) == ("meta", (rows, rows), layout)
        if layout != torch.strided:
            assert W._nnz() == exact
    W = conv_transpose_matrix(w, (256, 256), stride=2, padding=1, output_padding=1)
    assert W.device.type == "meta" and W.shape == (64 * 512 * 512, 64 * 256 * 256)
    table = tap_table(conv_geometry((64, 64, 3, 3), (512, 512), padding=1), "meta")
    assert table.device.type == "meta" and table.shape == (512 * 512, 9)
    assert (builds("pattern"), builds("block pattern"), builds("tap table")) == before
    assert cache_info() == {}


def test_meta_block_pattern_is_refused():
    geo = conv_geometry((64, 64, 3, 3), (512, 512), padding=1)
    with pytest.raises(ConvMatError, match=r"cannot be made on the meta device.*torch\.strided"):
        get_block_pattern(geo, 8, 8, torch.device("meta"))
    with pytest.raises(ConvMatError, match=r"cannot be made on the meta device"):
        get_pattern(geo, torch.device("meta"))


def test_meta_w_keeps_the_graph():
    w = torch.empty(4, 2, 3, 3, device="meta", requires_grad=True)
    for layout in (torch.strided, torch.sparse_csr):
        assert conv_matrix(w, 8, padding=1, layout=layout).requires_grad


# -- real refusals under an address-space rlimit, in a fresh interpreter ---------------------
RLIMIT_SNIPPET = """
import math
from convmat import ConvMatError, conv_matrix
from convmat.engine import cache_info, conv_geometry, get_pattern
from convmat.engine.cache import builds
out = {}
def attempt(name, make):
    try:
        made = make()
        out[name] = ["ok", list(made.shape), str(made.device)]
    except Exception as e:  # report any failure: the test says which kind is right
        out[name] = [type(e).__name__, str(e)]
attempt("dense", lambda: conv_matrix(torch.ones(1, 1, 3, 3), (178, 178), padding=1))
attempt("sparse", lambda: conv_matrix(torch.ones(64, 64, 3, 3), (128, 128), padding=1,
                                      layout=torch.sparse_csr))
geo = conv_geometry((64, 64, 3, 3), (512, 512), padding=1)
attempt("pattern", lambda: get_pattern(geo, torch.device("cpu")).gather)
meta = torch.empty(64, 64, 3, 3, device="meta")
for layout in (torch.strided, torch.sparse_csr):
    attempt(f"meta {layout}", lambda: conv_matrix(meta, (512, 512), padding=1, layout=layout))
w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
x = torch.randn(1, 2, 20, 20, dtype=torch.float64)
W = conv_matrix(w, (20, 20), padding=1)
out["small error"] = float((W @ x.flatten() - torch.nn.functional.conv2d(x, w, padding=1)
                            .flatten()).abs().max())
out["patterns built"] = builds("pattern")
out["cache"] = cache_info()
answer(**out)
"""


def test_refusals_under_an_address_space_rlimit():
    got = run_snippet(RLIMIT_SNIPPET, rlimit_as=3 * GiB)
    need = 178**4 * 4
    assert need > 4 * 10**9
    kind, message = got["dense"]
    assert kind == "ConvMatError", got["dense"]
    assert f"a dense W of shape (31684, 31684) and dtype torch.float32 needs {need:,} bytes" in (
        message
    )
    assert "limit: RLIMIT_AS, ulimit -v" in message and "use layout=torch.sparse_csr" in message
    kind, message = got["sparse"]
    assert kind == "ConvMatError", got["sparse"]
    assert "a sparse W of shape (1048576, 1048576)" in message and "RLIMIT_AS" in message
    kind, message = got["pattern"]
    assert kind == "ConvMatError", got["pattern"]
    assert "building the index pattern" in message and "RLIMIT_AS" in message
    rows = 64 * 512 * 512
    assert got["meta torch.strided"] == ["ok", [rows, rows], "meta"]
    assert got["meta torch.sparse_csr"] == ["ok", [rows, rows], "meta"]
    assert got["small error"] < 1e-12
    assert got["patterns built"] == 1  # the small W's only
    assert set(got["cache"]) == {"pattern"} and got["cache"]["pattern"]["entries"] == 1


def test_pattern_need_is_an_upper_bound_of_what_the_build_takes():
    """Measured: the peak resident memory of building patterns stays within the estimate
    the guard checks (so a build that passes the check does not then fail)."""
    got = run_snippet(
        """
        import resource
        from convmat.engine import conv_geometry, conv_transpose_geometry
        from convmat.engine.pattern import build_pattern, plan_pattern
        from convmat.engine.blocks import build_block_pattern, _block_build_bytes
        def peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rows = []
        for geo in (  # growing estimates: each build can raise the peak
            conv_transpose_geometry((32, 32, 3, 3), (64, 64), stride=2, padding=1),
            conv_geometry((32, 32, 3, 3), (128, 128), padding=1),
            conv_geometry((32, 32, 3, 3), (128, 128), padding=1, padding_mode="reflect"),
        ):
            plan = plan_pattern(geo)
            base = peak()
            build_pattern(geo, plan)
            rows.append(["pattern", plan.build_bytes(), peak() - base])
            need, _ = _block_build_bytes(geo, 8, 8)
            base = peak()
            build_block_pattern(geo, 8, 8)
            rows.append(["blocks", need, peak() - base])
        answer(rows=rows)
        """
    )
    for what, estimate, measured in got["rows"]:
        assert measured <= estimate + 8 * MiB, (what, estimate, measured)
        assert estimate >= 16 * MiB  # big enough for the measure to mean something
