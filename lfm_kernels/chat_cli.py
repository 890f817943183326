"""`lfm-kernels chat MODEL`: talk to an LFM2 / LFM2-MoE model in the terminal.

    lfm-kernels chat LFM2-8B-A1B-Q8_0.gguf                     interactive, tokens streamed as they come
    lfm-kernels chat ./LFM2-8B-A1B --system "Be brief." --tools tools.json
    lfm-kernels chat model.gguf -p "What is a short convolution?"   one reply, then exit

MODEL is a .gguf file (or a directory holding one) or a checkpoint directory (config.json +
safetensors + tokenizer). The prompt is rendered with the model's own chat template when its tokenizer
carries one (a GGUF file's `tokenizer.chat_template`), with LFM2's template otherwise. Sampling
defaults are the model card's: temperature 0.2, top-k 80, repetition penalty 1.05. Tool calls in a
reply are parsed and shown, never executed; in the interactive mode `/tool RESULT` answers them as a
`tool` turn. After each reply a line on stderr gives the prompt and generation speeds.

Interactive commands: /exit (or Ctrl-D), /reset (forget the conversation), /tool RESULT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

__all__ = ["add_parser", "main", "run"]

DEFAULTS = dict(temperature=0.2, top_k=80, top_p=1.0, repetition_penalty=1.05)


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", help="a .gguf file, a directory holding one, or a checkpoint directory")
    p.add_argument("-p", "--prompt", help="one-shot: answer this prompt, print the reply and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--tools", metavar="TOOLS.json", help="JSON list of tool descriptions offered to the model")
    p.add_argument("--max-new-tokens", type=int, default=512, help="per reply (default 512)")
    p.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], help="0 = greedy (default 0.2)")
    p.add_argument("--top-k", type=int, default=DEFAULTS["top_k"], help="default 80")
    p.add_argument("--top-p", type=float, default=DEFAULTS["top_p"], help="default 1.0")
    p.add_argument("--repetition-penalty", type=float, default=DEFAULTS["repetition_penalty"], help="default 1.05")
    p.add_argument("--seed", type=int, help="seed for sampling (reproducible replies)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="model dtype (default: the checkpoint's)")
    p.add_argument("--dequantize", action="store_true",
                   help="expand a quantized GGUF file's weights to the model dtype (needs ~4x the file's memory)")
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `chat` on an argparse subparsers object; the handler is `run(args)`."""
    p = subparsers.add_parser("chat", help="interactive chat with a model (.gguf file or checkpoint directory)",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(p)
    p.set_defaults(func=run)
    return p


def _load_tools(path: str | None):
    if path is None:
        return None
    try:
        with open(path) as f:
            tools = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--tools {path!r}: not a readable JSON file ({exc})") from exc
    if isinstance(tools, dict) and "tools" in tools:
        tools = tools["tools"]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError(f"--tools {path!r}: expected a JSON list of tool descriptions (objects)")
    return tools


class _Session:
    """One conversation: history, rendering, streaming generation, timings."""

    def __init__(self, model, args, tools, out=None, err=None):
        self.model, self.args, self.tools = model, args, tools
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.tok = model.tokenizer
        self.messages = []
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.args.system}] if self.args.system else []

    def render(self) -> list[int]:
        tok = self.tok
        if getattr(tok, "chat_template", None) and hasattr(tok, "apply_chat_template"):
            text = tok.apply_chat_template(self.messages, tools=self.tools, tokenize=False, add_generation_prompt=True)
        else:
            from .model.chat import apply_chat_template

            text = apply_chat_template(self.messages, tools=self.tools, add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False)

    def reply(self, role: str, content: str) -> str:
        """Add a turn, generate the assistant's answer with streaming, print it; returns its text."""
        from .model.chat import parse_tool_calls
        from .model.generate import eos_ids, generate

        self.messages.append({"role": role, "content": content})
        ids = self.render()
        stops = set(eos_ids(self.model))
        new: list[int] = []
        shown = [0]

        def stream(_row, token):
            if token in stops:
                return
            new.append(token)
            text = self.tok.decode(new, skip_special_tokens=False)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
                return
            self.out.write(text[shown[0]:])
            self.out.flush()
            shown[0] = len(text)

        a = self.args
        timings: dict = {}
        t0 = time.perf_counter()
        generate(self.model, [ids], a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                 repetition_penalty=a.repetition_penalty, callback=stream, seed=a.seed, timings=timings)
        wall = time.perf_counter() - t0
        text = self.tok.decode(new, skip_special_tokens=False)
        self.out.write(text[shown[0]:] + "\n")
        self.out.flush()
        self.messages.append({"role": "assistant", "content": text})
        parsed = parse_tool_calls(text)
        for call in parsed.tool_calls:
            self.err.write(f"[tool call, not executed] {call.name}({json.dumps(call.arguments, ensure_ascii=False)})\n")
        for e in parsed.errors:
            self.err.write(f"[malformed tool call] {e}\n")
        n_prompt = timings.get("prompt_tokens", len(ids))
        pre = timings.get("prefill_s", 0.0)
        steps = timings.get("decode_steps", 0)
        dec = timings.get("decode_s", 0.0)
        self.err.write(
            f"[prompt: {n_prompt} tokens, {n_prompt / pre if pre > 0 else float('inf'):.1f} tok/s | "
            f"generation: {len(new)} tokens, {steps / dec if dec > 0 and steps else 0.0:.1f} tok/s | {wall:.2f} s]\n"
        )
        self.err.flush()
        return text


def run(args) -> int:
    import torch

    from .model import from_pretrained

    if args.threads:
        torch.set_num_threads(args.threads)
    tools = _load_tools(args.tools)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not os.path.exists(args.model):
        print(f"lfm-kernels chat: no model at {args.model!r}", file=sys.stderr)
        return 2
    kw = {"dequantize": True} if args.dequantize else {}
    model = from_pretrained(args.model, dtype=args.dtype, progress=sys.stderr.isatty(), **kw)
    if model.tokenizer is None:
        print(f"lfm-kernels chat: {args.model!r} has no tokenizer; chat needs one", file=sys.stderr)
        return 2
    session = _Session(model, args, tools)
    if args.prompt is not None:
        session.reply("user", args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        print(f"chatting with {os.path.basename(os.path.abspath(args.model))} "
              "(/exit or Ctrl-D to quit, /reset to start over, /tool RESULT to answer a tool call)", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            session.reset()
            continue
        try:
            if line.startswith("/tool "):
                session.reply("tool", line[len("/tool "):])
            else:
                session.reply("user", line)
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            print("\n[interrupted]", file=sys.stderr)


def main(argv=None) -> int:
    """`python -m lfm_kernels.chat_cli MODEL ...` (the same as `lfm-kernels chat MODEL ...`)."""
    parser = _configure(argparse.ArgumentParser(prog="lfm-kernels chat", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:
        print(f"lfm-kernels chat: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
