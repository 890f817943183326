"""The `lfm-kernels` command's plumbing on tiny shapes: it runs, the JSON holds every requested op,
fallback rows say "reference", a wrong kernel is flagged. No timing asserts."""

import json
import math

import pytest
import torch

from lfm_kernels import _backend, cli
from lfm_kernels.benchmark import core
from lfm_kernels.benchmark.core import OPS, Case


@pytest.fixture
def fast_machine(monkeypatch):
    """Skip the (slow, here pointless) bandwidth and GEMM measurements: fixed, plausible figures."""
    monkeypatch.setattr(core, "measure_read_bandwidth", lambda device="cpu", nbytes=0, repeats=0: 20e9)
    monkeypatch.setattr(core, "measure_compute_peak", lambda device="cpu", quick=False: (100e9, "fixed for tests"))


def _bench(tmp_path, *extra):
    path = tmp_path / "bench.json"
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--min-time", "0.001", "--json", str(path), *extra])
    return rc, json.loads(path.read_text())


def test_bench_short_conv_json(tmp_path, fast_machine, capsys):
    rc, data = _bench(tmp_path, "--ops", "short_conv")
    assert rc == 0
    rows = data["rows"]
    assert rows and {r["op"] for r in rows} == {"short_conv"}
    assert {r["dtype"] for r in rows} == {"bf16", "fp32"}
    for r in rows:
        assert r["check"]["ok"], r["check"]
        assert r["backend"] == _backend.cpu_isa()
        assert r["times_s"]["kernel"] > 0 and r["times_s"]["eager"] > 0
        assert r["best_baseline"] in r["times_s"]
        assert r["speedup_vs_eager"] > 0 and r["share_of_floor"] > 0 and r["GBps"] > 0
    assert data["machine"]["torch"] == torch.__version__
    assert data["devices"]["cpu"]["bandwidth"] == 20e9 and data["complete"] is True
    out = capsys.readouterr().out
    assert "short_conv" in out and "decode-B1-T1-D2048" in out and "MISMATCH" not in out


def test_bench_every_available_op(tmp_path, fast_machine, monkeypatch):
    """Every op in the registry either has rows or is listed as skipped (with the reason)."""
    # The real cases of every op would make this test slow; one tiny case per op is
    # enough to check the plumbing end to end.
    real = core.discover_cases

    def first_case_per_op(ops, device, quick=False):
        cases, skipped = real(ops, device, quick)
        seen, keep = set(), []
        for c in cases:
            if c.op not in seen:
                seen.add(c.op)
                keep.append(c)
        return keep, skipped

    monkeypatch.setattr(core, "discover_cases", first_case_per_op)
    rc, data = _bench(tmp_path)
    assert rc in (0, 1)  # 1 only when a kernel disagrees: reported, not this test's subject
    for op in OPS:
        assert any(r["op"] == op for r in data["rows"]) or op in data["skipped_ops"], op


def test_bench_reference_fallback_labelled(tmp_path, fast_machine, monkeypatch):
    """With the extension gone (as on a machine without a compiler) rows run and say 'reference'."""
    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "_EXT_ERROR", "forced off by the test")
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(RuntimeWarning, match="not available"):
        rc, data = _bench(tmp_path, "--ops", "short_conv")
    assert rc == 0
    assert data["rows"] and all(r["backend"] == "reference" for r in data["rows"])
    assert data["machine"]["extension_loaded"] is False


def test_mismatch_is_loud(tmp_path, fast_machine, monkeypatch, capsys):
    """A kernel that disagrees with eager is flagged in the table and the exit status."""
    real = core.discover_cases

    def broken(ops, device, quick=False):
        cases, skipped = real(ops, device, quick)
        case = cases[0]
        good = case.kernel
        case.kernel = lambda inp: good(inp) * 1.5
        return [case], skipped

    monkeypatch.setattr(core, "discover_cases", broken)
    rc, data = _bench(tmp_path, "--ops", "short_conv")
    assert rc == 1
    assert not data["rows"][0]["check"]["ok"]
    assert "MISMATCH" in capsys.readouterr().out


def test_check_case_compares_in_place_state():
    """A kernel with the right output but a wrong state update is caught."""

    def make():
        return {"x": torch.randn(8), "state": torch.randn(4)}

    def eager(inp):
        inp["state"].copy_(inp["x"][:4])
        return inp["x"] * 2

    def kernel(inp):
        inp["state"].copy_(inp["x"][4:])
        return inp["x"] * 2

    case = Case("toy", "toy", torch.float32, "cpu", make, kernel, {"eager": eager})
    res = core.check_case(case)
    assert not res.ok and "state" in res.detail
    case.kernel = eager
    assert core.check_case(case).ok


def test_check_case_nan_fails():
    case = Case("toy", "toy", torch.float32, "cpu", lambda: {"x": torch.randn(5)},
                lambda i: i["x"] * math.nan, {"eager": lambda i: i["x"]})
    assert not core.check_case(case).ok


def test_missing_op_module_is_skipped():
    cases, skipped = core.discover_cases(("short_conv",), "cpu", quick=True)
    assert cases and not skipped
    with pytest.raises(ImportError):
        core.load_case_module("no_such_op")


def test_unknown_op_is_an_error(capsys):
    assert cli.main(["bench", "--ops", "nope"]) == 2
    assert "unknown op" in capsys.readouterr().err


def test_e2e_without_module_or_with_stub(tmp_path, fast_machine, monkeypatch, capsys):
    """--e2e prints the end-to-end rows in their own table (a stub stands in for the real run)."""
    import sys
    import types

    calls = {}

    def run_e2e(**kw):
        calls.update(kw)
        return [{"phase": "decode", "tokens_per_s": 12.5}, {"phase": "prefill", "tokens_per_s": 300.0}]

    monkeypatch.setitem(sys.modules, "lfm_kernels.benchmark.e2e", types.SimpleNamespace(run_e2e=run_e2e))
    rc, data = _bench(tmp_path, "--ops", "none", "--e2e")
    assert rc == 0
    assert data["rows"] == [] and data["e2e"][0]["tokens_per_s"] == 12.5
    assert calls["num_layers"] == 2  # --quick shrinks the model
    assert "tokens_per_s" in capsys.readouterr().out


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert cli.main(["bench", "--quick", "--plot", str(tmp_path / "p.png")]) == 2
    assert "matplotlib" in capsys.readouterr().err


def test_info_runs(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CPU kernel path" in out and torch.__version__ in out
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpu_isa"] == _backend.cpu_isa() and "short_conv" in info["benchmark_ops"]


def test_bench_suites_collect_the_same_cases():
    """bench/ (pytest-benchmark, not part of this suite) parametrizes over the command's cases."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "pytest", "bench", "--collect-only", "-q", "--lfm-quick",
                          "-p", "no:cacheprovider"], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "test_bench_short_conv.py::test_short_conv[decode-B1-T1-D2048-bf16-kernel]" in res.stdout
    assert "test_bench_short_conv.py::test_short_conv[decode-B1-T1-D2048-fp32-eager]" in res.stdout


def test_moe_tune_writes_the_config_table(tmp_path):
    """The block-size search's plumbing, with the reference standing in for the Triton kernel."""
    import importlib.util
    import pathlib

    from lfm_kernels import reference

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "moe_tune.py"
    spec = importlib.util.spec_from_file_location("moe_tune", path)
    moe_tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(moe_tune)

    seen = []

    def run(inp, config):
        seen.append(config)
        out = reference.moe_experts(inp["hidden"], inp["gate_up_proj"], inp["down_proj"], inp["topk_ids"],
                                    inp["topk_weights"])
        return out * 1.5 if config and config["num_stages"] == 3 else out  # one "buggy" config

    out = tmp_path / "moe_configs.json"
    out.write_text(json.dumps({"E=8,N=1,H=1,dtype=bf16": {"1": {"BLOCK_M": 16}}}))  # another shape: kept
    rows = moe_tune.tune([2, 8], shape=(4, 32, 64), device="cpu", out=str(out), max_configs=3, run=run,
                         log=lambda *a: None)
    table = json.loads(out.read_text())
    assert set(table) == {"E=8,N=1,H=1,dtype=bf16", "E=4,N=32,H=64,dtype=bf16"}
    entry = table["E=4,N=32,H=64,dtype=bf16"]
    assert set(entry) == {"2", "8"} and [r["M"] for r in rows] == [2, 8]
    assert all(c["num_stages"] != 3 for c in entry.values())  # the wrong config is never chosen
    assert None in seen and len(seen) > 3
    assert len(moe_tune.candidate_configs(1, 32)) >= 12 and len(moe_tune.candidate_configs(4096, 32)) <= 48


def test_check_case_falls_back_when_eager_cannot_run():
    def eager(inp):
        raise RuntimeError("not on this device")

    case = Case("toy", "toy", torch.float32, "cpu", lambda: {"x": torch.randn(5)}, lambda i: i["x"] * 2,
                {"eager": eager, "other": lambda i: i["x"] * 2})
    res = core.check_case(case)
    assert res.ok and res.checked and res.against == "other"
    case.baselines = {"eager": eager}
    res = core.check_case(case)
    assert res.ok and not res.checked and "not on this device" in res.detail


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "--threads", "-1"], "--threads"),
        (["bench", "--threads", "0"], "--threads"),
        (["info", "--threads", "0"], "--threads"),
        (["bench", "--num-layers", "0"], "--num-layers"),
        (["bench", "--prompt-len", "0"], "--prompt-len"),
        (["bench", "--new-tokens", "0"], "--new-tokens"),
        (["bench", "--new-tokens", "two"], "--new-tokens"),
        (["bench", "--min-time", "-1"], "--min-time"),
        (["bench", "--min-time", "nan"], "--min-time"),
        (["bench", "--min-time", "inf"], "--min-time"),
        (["bench", "--json", "{missing}/out.json"], "--json"),
        (["bench", "--json", "{dir}"], "--json"),
        (["bench", "--plot", "{missing}/p.png"], "--plot"),
    ],
)
def test_bad_arguments_rejected_before_any_work(args, message, tmp_path, monkeypatch, capsys):
    """Nonsense values end at argument parsing (argparse's exit status 2), before anything is measured."""
    from lfm_kernels.benchmark import runner

    def no_work(*a, **kw):
        raise AssertionError("work started despite a bad argument")

    monkeypatch.setattr(runner, "run", no_work)
    monkeypatch.setattr(cli, "_info", no_work)
    args = [a.format(missing=tmp_path / "missing", dir=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_good_arguments_reach_the_runner(tmp_path, monkeypatch):
    from lfm_kernels.benchmark import runner

    seen = {}
    monkeypatch.setattr(runner, "run", lambda args: seen.update(vars(args)) or 0)
    argv = ["bench", "--threads", "2", "--num-layers", "1", "--prompt-len", "3", "--new-tokens", "1",
            "--min-time", "0", "--json", str(tmp_path / "out.json")]
    assert cli.main(argv) == 0
    assert seen["threads"] == 2 and seen["num_layers"] == 1 and seen["min_time"] == 0.0
    assert seen["json"] == str(tmp_path / "out.json")
