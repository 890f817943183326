"""pytest-benchmark suites, one file per op, timing exactly the Case objects `lfm-kernels bench` times.

Each test_bench_<op>.py declares OP; this conftest parametrizes it over that op's cases() (ids: case
name, dtype, then which implementation: kernel, eager, sdpa, ...), checks the kernel against the
eager baseline once per case before timing it, and records GB/s (or GFLOP/s) and the share of the
hardware floor in benchmark.extra_info. An op whose cases cannot be built here is one skipped test.

    python -m pytest bench/ --benchmark-json=bench.json          # all ops, CPU (and CUDA when present)
    python -m pytest bench/test_bench_short_conv.py --lfm-quick  # small shapes
    python -m pytest bench/ --lfm-device=cuda --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import pytest
import torch

from lfm_kernels.benchmark import core


def pytest_addoption(parser):
    group = parser.getgroup("lfm-kernels")
    group.addoption("--lfm-quick", action="store_true", help="small shapes (the cases' quick=True)")
    group.addoption("--lfm-device", choices=("cpu", "cuda", "all"), default="all",
                    help="cases for this device (default: cpu, and cuda when present)")


def _devices(config) -> list[str]:
    choice = config.getoption("--lfm-device")
    has_cuda = torch.cuda.is_available()
    if choice == "cuda" and not has_cuda:
        raise pytest.UsageError("--lfm-device=cuda but torch sees no CUDA device")
    if choice == "all":
        return ["cpu", "cuda"] if has_cuda else ["cpu"]
    return [choice]


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    op = metafunc.module.OP
    quick = metafunc.config.getoption("--lfm-quick")
    params, reasons = [], []
    for device in _devices(metafunc.config):
        cases, skipped = core.discover_cases((op,), device, quick=quick)
        reasons += [f"{device}: {why}" for why in skipped.values()]
        for case in cases:
            prefix = "" if device == "cpu" else f"{device}-"
            for impl in ["kernel", *case.baselines]:
                params.append(pytest.param(case, impl, id=f"{prefix}{case.name}-{core.dtype_name(case.dtype)}-{impl}"))
    if not params:
        params = [pytest.param(None, None, id="no-cases",
                               marks=pytest.mark.skip(reason=f"{op}: " + ("; ".join(reasons) or "no cases")))]
    metafunc.parametrize(("bench_case", "impl"), params)


class _Machine:
    """This machine's measured limits, once per session and device (as the command measures them)."""

    def __init__(self):
        self._cache: dict[str, tuple[float, float]] = {}

    def limits(self, device: str) -> tuple[float, float]:
        if device not in self._cache:
            self._cache[device] = (core.measure_read_bandwidth(device), core.measure_compute_peak(device)[0])
        return self._cache[device]


@pytest.fixture(scope="session")
def machine():
    return _Machine()


_checked: set[int] = set()


def _finite(**figures) -> dict:
    """None for a figure a case cannot give (NaN: no byte or FLOP count), so the JSON stays standard."""
    return {k: (v if v == v and abs(v) != float("inf") else None) for k, v in figures.items()}


@pytest.fixture
def run_bench(benchmark, machine):
    def run(case: core.Case, impl: str):
        if id(case) not in _checked:
            # A benchmark of a wrong kernel is worthless: check it once per case, as the command does.
            res = core.check_case(case)
            _checked.add(id(case))
            assert res.ok, f"kernel disagrees with {res.against}: rel err {res.error:.3g} > {res.tol:g} ({res.detail})"
        fn = case.kernel if impl == "kernel" else case.baselines[impl]
        inputs = case.make_inputs()
        if case.device.startswith("cuda"):

            def call():
                fn(inputs)
                torch.cuda.synchronize()
        else:

            def call():
                fn(inputs)

        benchmark.group = case.op
        benchmark.extra_info.update(
            op=case.op, case=case.name, dtype=core.dtype_name(case.dtype), device=case.device,
            impl=impl, backend=case.backend if impl == "kernel" else "torch",
            bytes_moved=case.bytes_moved, flops=case.flops, compute_bound=case.compute_bound,
        )
        benchmark(call)
        if benchmark.disabled or benchmark.stats is None:  # --benchmark-disable: ran once, no figures
            return
        median = benchmark.stats.stats.median
        bandwidth, peak = machine.limits(case.device)
        floor = core.floor_seconds(case, bandwidth, peak)
        benchmark.extra_info.update(_finite(
            median_s=median,
            GBps=core.gbps(case, median),
            GFLOPs=core.gflops(case, median),
            bandwidth_GBps=bandwidth / 1e9,
            compute_peak_GFLOPs=peak / 1e9,
            share_of_floor=floor / median,
        ))

    return run
