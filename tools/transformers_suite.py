#!/usr/bin/env python
"""Run transformers' own LFM2 / LFM2-MoE model tests unpatched and with `lfm_kernels.patch()`, and compare.

transformers' test files are not ours to ship, so this script takes them from a path and assembles a
throwaway test tree in a work directory:

    python tools/transformers_suite.py --tests-dir /path/to/transformers/tests \
        [--common-dir /path/to/transformers-X.Y.Z/tests] [--workdir DIR] [--variants ...] [--no-slow]

--tests-dir   a transformers repository's `tests/` directory (a checkout at the installed version, or
              the closest one available): it provides `causal_lm_tester.py`, `generation/`,
              `exporters/`, `utils/test_configuration_utils.py`, `utils/tiny_model_summary.json` and
              `models/lfm2`, `models/lfm2_moe`.
--common-dir  optional: the `tests/` directory of the installed version's source distribution
              (`pip download transformers==X --no-binary :all: --no-deps`), which ships only the
              top-level common testers (`tests/*.py`: test_modeling_common.py, test_pipeline_mixin.py,
              ...); those files replace the repository's, so the common tests are the installed
              version's own.
--lfm2-test / --lfm2-moe-test
              optional: explicit paths of the two model test modules (default: taken from --tests-dir).

Variants (each one pytest process, so a patch never leaks into an unpatched run):
    unpatched       the testers as shipped (head_dim 16: our decode-attention kernel never runs there)
    patched         the same, with `lfm_kernels.patch()` called before collection
    unpatched-hd64  the testers with hidden_size = 64 * num_attention_heads (head_dim 64)
    patched-hd64    the same, patched: the configuration where every kernel, decode attention included, runs
Each variant runs the whole of both modules, then (unless --no-slow) a second pass with RUN_SLOW=1
restricted to the export tests (`-k export`), the slow tests among them that need no accelerator and no
download; a test's slow-pass outcome replaces its first-pass one (where it was skipped as slow).

The shims, all confined to the work directory (nothing in transformers' files is edited):
  * conftest.py at the tree root: registers transformers' pytest markers; when LFMK_SUITE_PATCH=1
    calls `lfm_kernels.patch()` before any test module is imported; when LFMK_SUITE_HEAD_DIM is set,
    wraps `CausalLMModelTester.__init__` so the testers' default hidden_size is
    head_dim * num_attention_heads (the subclass testers of both modules pass no hidden_size, so this
    is the smallest change that gives every model built by the suite that head size); and, if the
    installed `transformers.testing_utils` lacks `_TEXT_MODEL_TESTER_DEFAULTS` (moved between
    releases) while the repository's causal_lm_tester.py imports it, defines it with the values the
    repository used.
  * tests/utils/test_configuration_utils.py: only its `config_common_kwargs` literal (the file itself
    imports httpx and Hub helpers that the common tests never use), extracted with `ast`.
  * tests/distributed_testing_utils.py, when --tests-dir has none (newer common testers import it for
    the FSDP / tensor-parallel mixins): a stub whose every helper skips the test that calls it; those
    tests need several processes or GPUs and never run here anyway.
  * src/transformers: a link to the installed package (test_pipeline_mixin.py imports it by path).

The tests run on the installed transformers and on the lfm_kernels of the repository this script is
in. Needs pytest, parameterized and (for --timeout) pytest-timeout. Output: a pass/fail/skip table per
variant and per module, then the names of the tests whose outcome differs between each patched
variant and its unpatched twin; exit status 1 when any test passes unpatched and fails patched.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULES = ("lfm2", "lfm2_moe")
VARIANTS = {
    # name: (patched, head_dim or None)
    "unpatched": (False, None),
    "patched": (True, None),
    "unpatched-hd64": (False, 64),
    "patched-hd64": (True, 64),
}

_CONFTEST = '''\
"""Shims for running transformers' LFM2 model tests outside transformers' repository (written by
lfm-kernels' tools/transformers_suite.py; see its docstring)."""
import os

import transformers.testing_utils as _tu

_MARKERS = (
    "is_pipeline_test", "is_staging_test", "accelerate_tests", "not_device_test", "torch_compile_test",
    "torch_export_test", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "bitsandbytes",
    "generate", "training_ci", "tensor_parallel_ci", "fsdp_ci", "is_flaky",
)


def pytest_configure(config):
    for name in _MARKERS:
        config.addinivalue_line("markers", f"{name}: transformers test marker")


if not hasattr(_tu, "_TEXT_MODEL_TESTER_DEFAULTS"):
    _tu._TEXT_MODEL_TESTER_DEFAULTS = __TEXT_DEFAULTS__

if os.environ.get("LFMK_SUITE_HEAD_DIM"):
    import functools

    from tests import causal_lm_tester as _clt

    _head_dim = int(os.environ["LFMK_SUITE_HEAD_DIM"])
    _init = _clt.CausalLMModelTester.__init__

    @functools.wraps(_init)
    def _init_with_head_dim(self, parent, *args, **kwargs):
        heads = kwargs.get("num_attention_heads", _tu._TEXT_MODEL_TESTER_DEFAULTS["num_attention_heads"])
        kwargs.setdefault("hidden_size", _head_dim * heads)
        _init(self, parent, *args, **kwargs)
        assert self.head_dim == _head_dim, (self.head_dim, _head_dim)

    _clt.CausalLMModelTester.__init__ = _init_with_head_dim

if os.environ.get("LFMK_SUITE_PATCH") == "1":
    import lfm_kernels

    lfm_kernels.patch()
'''

# The values transformers' repository used for `_TEXT_MODEL_TESTER_DEFAULTS` (testing_utils.py) while
# causal_lm_tester.py imported it; used only when the installed transformers does not define it.
_TEXT_DEFAULTS = {
    "batch_size": 13, "seq_length": 7, "is_training": True, "use_input_mask": True, "use_labels": True,
    "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 2, "intermediate_size": 32, "hidden_act": "gelu", "max_position_embeddings": 512,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "expert_interval": 1, "moe_layer_start_index": 0,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 36, "shared_expert_gate": True,
    "moe_num_shared_experts": 2, "num_experts_per_tok": 2, "num_experts": 8,
}  # fmt: skip

_DISTRIBUTED_STUB = '''\
"""Stub: the FSDP / tensor-parallel mixins import these helpers; their tests need several processes."""
import pytest


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def _unavailable(*args, **kwargs):
        pytest.skip(f"distributed_testing_utils.{name} is not available in this test tree")

    return _unavailable
'''


def _config_common_kwargs(path: Path) -> str:
    """The `config_common_kwargs = {...}` statement of transformers' tests/utils/test_configuration_utils.py."""
    source = path.read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "config_common_kwargs" for t in node.targets):
            return ast.get_source_segment(source, node) + "\n"
    raise SystemExit(f"{path} defines no config_common_kwargs")


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise SystemExit(f"missing {what}: {path}")
    return path


def build_tree(args, tree: Path) -> Path:
    """Assemble the test tree under `tree` (replaced if present); returns it."""
    src = Path(args.tests_dir).resolve()
    _require(src / "causal_lm_tester.py", "--tests-dir/causal_lm_tester.py")
    if tree.exists():
        shutil.rmtree(tree)
    tests = tree / "tests"
    tests.mkdir(parents=True)
    for f in src.glob("*.py"):
        if f.name != "conftest.py":
            shutil.copy2(f, tests / f.name)
    if args.common_dir:
        for f in Path(args.common_dir).resolve().glob("*.py"):
            if f.name != "conftest.py":
                shutil.copy2(f, tests / f.name)
    (tests / "__init__.py").touch()
    for sub in ("generation", "exporters"):
        shutil.copytree(_require(src / sub, f"--tests-dir/{sub}"), tests / sub)
    utils = tests / "utils"
    utils.mkdir()
    (utils / "__init__.py").touch()
    (utils / "test_configuration_utils.py").write_text(
        _config_common_kwargs(_require(src / "utils" / "test_configuration_utils.py", "test_configuration_utils.py"))
    )
    shutil.copy2(_require(src / "utils" / "tiny_model_summary.json", "tiny_model_summary.json"), utils)
    if not (tests / "distributed_testing_utils.py").exists():
        (tests / "distributed_testing_utils.py").write_text(_DISTRIBUTED_STUB)
    models = tests / "models"
    models.mkdir()
    (models / "__init__.py").touch()
    explicit = {"lfm2": args.lfm2_test, "lfm2_moe": args.lfm2_moe_test}
    for name in MODULES:
        (models / name).mkdir()
        (models / name / "__init__.py").touch()
        path = Path(explicit[name]) if explicit[name] else src / "models" / name / f"test_modeling_{name}.py"
        shutil.copy2(_require(path, f"{name} test module"), models / name / f"test_modeling_{name}.py")
    (tree / "conftest.py").write_text(_CONFTEST.replace("__TEXT_DEFAULTS__", repr(_TEXT_DEFAULTS)))
    import transformers  # the installed one, which the tests run against

    (tree / "src").mkdir()
    (tree / "src" / "transformers").symlink_to(Path(transformers.__file__).parent)
    return tree


def _parse_junit(path: Path) -> dict[str, str]:
    """nodeid-ish name -> passed / failed / error / skipped."""
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed" if child.tag == "failure" else "error"
                break
            if child.tag == "skipped":
                status = "skipped"
        if out.get(name) in ("failed", "error"):  # a teardown error after a failure keeps the failure
            continue
        out[name] = status
    return out


def run_variant(args, tree: Path, name: str, outdir: Path) -> dict[str, str]:
    patched, head_dim = VARIANTS[name]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("RUN_SLOW", None)
    env["LFMK_SUITE_PATCH"] = "1" if patched else "0"
    if head_dim:
        env["LFMK_SUITE_HEAD_DIM"] = str(head_dim)
    else:
        env.pop("LFMK_SUITE_HEAD_DIM", None)
    targets = [f"tests/models/{m}" for m in MODULES]
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-W", "ignore", "-rN"]
    if args.timeout:
        base += ["--timeout", str(args.timeout)]
    if args.k:
        base += ["-k", args.k]
    results: dict[str, str] = {}
    passes = [("", env, base)]
    if not args.no_slow:
        slow_k = "export" if not args.k else f"({args.k}) and export"
        slow_cmd = [a for a in base if a not in ("-k", args.k)] if args.k else list(base)
        slow_cmd += ["-k", slow_k]
        passes.append(("-slow", dict(env, RUN_SLOW="1"), slow_cmd))
    for suffix, penv, cmd in passes:
        xml = outdir / f"{name}{suffix}.xml"
        log = outdir / f"{name}{suffix}.log"
        print(f"[{name}{suffix}] running ... (log: {log})", flush=True)
        with open(log, "w") as fh:
            subprocess.run(cmd + [f"--junitxml={xml}"] + targets, cwd=tree, env=penv, stdout=fh, stderr=subprocess.STDOUT)
        for test, status in _parse_junit(xml).items():
            if suffix and status == "skipped" and test in results:
                continue  # the slow pass skips nothing new the first pass ran
            results[test] = status
        print(f"[{name}{suffix}] {dict(Counter(_parse_junit(xml).values()))}", flush=True)
    return results


def _module_of(test: str) -> str:
    for m in sorted(MODULES, key=len, reverse=True):
        if f".{m}." in test or test.startswith(f"tests.models.{m}."):
            return m
    return "?"


def report(all_results: dict[str, dict[str, str]]) -> int:
    statuses = ("passed", "failed", "error", "skipped")
    print("\n| variant | module | " + " | ".join(statuses) + " |")
    print("|---|---|" + "---:|" * len(statuses))
    for variant, res in all_results.items():
        for m in MODULES:
            c = Counter(s for t, s in res.items() if _module_of(t) == m)
            print(f"| {variant} | {m} | " + " | ".join(str(c.get(s, 0)) for s in statuses) + " |")
    regressions = 0
    for variant in all_results:
        if not variant.startswith("patched"):
            continue
        twin = "un" + variant
        if twin not in all_results:
            continue
        a, b = all_results[twin], all_results[variant]
        diff = sorted(t for t in set(a) | set(b) if a.get(t) != b.get(t))
        print(f"\n{variant} vs {twin}: {len(diff)} tests differ")
        for t in diff:
            ua, pa = a.get(t, "absent"), b.get(t, "absent")
            print(f"  {t}: {twin}={ua} {variant}={pa}")
            if ua == "passed" and pa in ("failed", "error"):
                regressions += 1
    print(f"\npassed unpatched, failed patched: {regressions}")
    return 1 if regressions else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tests-dir", required=True, help="a transformers repository's tests/ directory")
    p.add_argument("--common-dir", help="the installed version's sdist tests/ (overrides tests/*.py)")
    p.add_argument("--lfm2-test", help="path of test_modeling_lfm2.py (default: from --tests-dir)")
    p.add_argument("--lfm2-moe-test", help="path of test_modeling_lfm2_moe.py (default: from --tests-dir)")
    p.add_argument("--workdir", help="where the tree, logs and junit files go (default: a new temp dir)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("-k", help="pytest -k selection, for quick reruns")
    p.add_argument("--timeout", type=int, default=600, help="per-test timeout in seconds (pytest-timeout); 0: none")
    p.add_argument("--no-slow", action="store_true", help="skip the RUN_SLOW=1 pass over the export tests")
    args = p.parse_args(argv)
    if args.timeout:
        try:
            import pytest_timeout  # noqa: F401
        except ImportError:
            raise SystemExit("--timeout needs pytest-timeout (pip install pytest-timeout), or pass --timeout 0")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lfmk-hfsuite-"))
    work.mkdir(parents=True, exist_ok=True)
    tree = build_tree(args, work / "tree")
    print(f"test tree: {tree}")
    all_results = {v: run_variant(args, tree, v, work) for v in args.variants}
    return report(all_results)


if __name__ == "__main__":
    sys.exit(main())
