"""`lfm-kernels chat` (lfm_kernels.chat_cli) on a tiny GGUF file with a tokenizer and chat template:
the one-shot -p mode (in-process through add_parser/run, and as a process), and the interactive mode
driven through a pseudo-terminal."""

import argparse
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from lfm_kernels import chat_cli  # noqa: E402
from lfm_kernels.model import from_pretrained  # noqa: E402
from lfm_kernels.model.gguf_write import write_gguf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from test_model import _hf_model, _moe_config

    d = tmp_path_factory.mktemp("chat")
    _hf_model(_moe_config(vocab_size=300)).save_pretrained(d / "st")
    return write_gguf(d / "tiny.gguf", from_pretrained(d / "st", progress=False), "F32")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_one_shot_in_process(tiny_gguf, capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    chat_cli.add_parser(sub)
    args = parser.parse_args(["chat", tiny_gguf, "-p", "Hello there", "--max-new-tokens", "6", "--temperature", "0",
                              "--system", "Be brief."])
    assert args.top_k == 80 and args.repetition_penalty == 1.05 and args.temperature == 0
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and len(out.strip()) > 0
    assert "prompt:" in err and "generation:" in err and "tok/s" in err


def test_one_shot_process_with_tools(tiny_gguf, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"name": "get_weather", "description": "Weather", "parameters": {}}]))
    r = subprocess.run([sys.executable, "-m", "lfm_kernels.chat_cli", tiny_gguf, "-p", "Weather in Paris?",
                        "--tools", str(tools), "--max-new-tokens", "8", "--seed", "1"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(r.stdout.strip()) > 0
    assert "generation:" in r.stderr


def test_bad_tools_file(tiny_gguf, tmp_path):
    bad = tmp_path / "tools.json"
    bad.write_text('{"name": "not a list"}')
    assert chat_cli.main([tiny_gguf, "-p", "x", "--tools", str(bad)]) == 2
    assert chat_cli.main([str(tmp_path / "missing.gguf"), "-p", "x"]) == 2


def _read_until(fd, needle: str, buf: list, count: int = 1, timeout: float = 300.0) -> str:
    """Read the terminal into buf until needle has appeared `count` times in all of it."""
    end = time.time() + timeout
    while "".join(buf).count(needle) < count:
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {needle!r}; got {''.join(buf)[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            buf.append(chunk.decode("utf-8", "replace"))
    return "".join(buf)


def test_interactive_through_a_pseudo_terminal(tiny_gguf):
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "lfm_kernels.chat_cli", tiny_gguf, "--max-new-tokens", "5",
                          "--temperature", "0"], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=_env(),
                         close_fds=True)
    os.close(slave)
    buf: list = []
    try:
        # type each line at its prompt, as a person would
        _read_until(master, "> ", buf)
        os.write(master, b"Hello\n")
        _read_until(master, "tok/s", buf)
        _read_until(master, "> ", buf, count=2)
        os.write(master, b"/reset\n")
        _read_until(master, "> ", buf, count=3)
        os.write(master, b"How are you?\n")
        _read_until(master, "tok/s", buf, count=2)
        _read_until(master, "> ", buf, count=4)
        os.write(master, b"\x04")  # Ctrl-D: end of input
        assert p.wait(timeout=120) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    out = "".join(buf)
    assert "chatting with tiny.gguf" in out and out.count("generation:") == 2
