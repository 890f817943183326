"""Backend selection: info, the reference fallback when the extension is missing, the portable switch."""

import pathlib
import shutil
import subprocess
import warnings

import pytest
import torch

import lfm_kernels
from lfm_kernels import _backend, reference
from conftest import assert_close


def test_backend_info_fields():
    info = lfm_kernels.backend_info()
    for key in ("extension_loaded", "extension_error", "cpu_isa", "cpu_supports_avx2_fma", "torch", "triton", "cuda_device"):
        assert key in info
    assert info["extension_loaded"], f"the CPU extension should be built for the tests: {info['extension_error']}"
    assert info["cpu_isa"] in ("avx512", "avx2", "portable")


def test_force_portable_switch():
    before = _backend.cpu_isa()
    with _backend.force_portable_cpu():
        assert _backend.cpu_isa() == "portable"
    assert _backend.cpu_isa() == before


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "_EXT_ERROR", "simulated: not built")
    monkeypatch.setattr(_backend, "_warned", set())
    bcx, weight = torch.randn(2, 5, 48), torch.randn(16, 3)
    state, ref_state = torch.randn(2, 16, 3), None
    ref_state = state.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = lfm_kernels.short_conv(bcx, weight, None, state)
        lfm_kernels.short_conv(bcx, weight, None, state.clone())
    messages = [str(w.message) for w in caught if "extension is not available" in str(w.message)]
    assert len(messages) == 1, messages
    assert "simulated: not built" in messages[0]
    assert_close(out, reference.short_conv(bcx, weight, None, ref_state))
    assert torch.equal(state, ref_state)
    assert lfm_kernels.backend_info()["cpu_isa"] == "reference"


def test_force_portable_without_extension_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_backend, "_C", None)
    with pytest.raises(RuntimeError, match="not loaded"):
        with _backend.force_portable_cpu():
            pass


# ---------------------------------------------------------------- CI reads the README's test command

_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _ci_print(*args):
    return subprocess.run(
        ["bash", str(_ROOT / ".ci" / "run"), "--print-command", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_ci_extracts_the_readme_test_command():
    """.ci/run finds exactly one marked pytest line in README.md, whatever the prose around it says."""
    res = _ci_print()
    assert res.returncode == 0, res.stderr
    cmd = res.stdout.strip()
    assert "\n" not in cmd and "pytest" in cmd and "tests" in cmd
    assert "# ci:" not in cmd
    readme = (_ROOT / "README.md").read_text()
    assert cmd in readme.split("```")[1], "the CI command is not in README's first code block"


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize(
    "text, message",
    [
        ("no marker here\npython -m pytest -q tests\n", "found 0"),
        ("pytest a  # ci: test command\npytest b  # ci: test command\n", "found 2"),
        ("echo hello  # ci: test command\n", "not a pytest command"),
    ],
    ids=["missing", "twice", "not-pytest"],
)
def test_ci_extraction_fails_loudly(tmp_path, text, message):
    readme = tmp_path / "README.md"
    readme.write_text(text)
    res = _ci_print(str(readme))
    assert res.returncode != 0 and message in res.stderr, (res.returncode, res.stdout, res.stderr)


@pytest.mark.skipif(_backend._C is None, reason="CPU extension not built")
@pytest.mark.parametrize("nbytes", [0, 8, 1000, (1 << 20) + 24, (3 << 20) + 8 * 37])
def test_read_probe_reads_every_word(nbytes):
    """The bandwidth probe behind the floors XORs every 8-byte word (so no read can be skipped): the
    same as numpy's XOR, on the AVX2 path with and without software prefetch and on the portable path,
    for sizes around its 1 MiB pieces."""
    import numpy as np

    buf = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    words = buf[: nbytes // 8 * 8].numpy().view(np.uint64)
    expect = int(np.bitwise_xor.reduce(words)) if words.size else 0
    expect = expect - (1 << 64) if expect >= 1 << 63 else expect  # the op returns a signed int64
    assert torch.ops.lfm_kernels_cpu._read_probe(buf) == expect
    assert torch.ops.lfm_kernels_cpu._read_probe(buf, True) == expect
    with _backend.force_portable_cpu():
        assert torch.ops.lfm_kernels_cpu._read_probe(buf) == expect


@pytest.mark.skipif(_backend._C is None, reason="CPU extension not built")
def test_amx_check_is_no_looser_than_cpuid():
    """AMX counts as usable only when the CPU has it (what torch's CPUID check says) and the kernel
    granted the tile state; info reports that answer."""
    ours = _backend._C.cpu_supports_amx()
    assert isinstance(ours, bool)
    if ours:
        assert torch.cpu._is_amx_tile_supported()
    assert _backend.backend_info()["cpu_amx_usable"] == ours
