"""Chat template (DESIGN.md) and tool-call parsing for LFM2 models.

Template (ChatML-like):
    <|startoftext|><|im_start|>system\n...<|im_end|>\n<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n
Tools are listed in the system turn as JSON between <|tool_list_start|> and <|tool_list_end|>; the
model answers with Pythonic calls between <|tool_call_start|> and <|tool_call_end|>, e.g.
    <|tool_call_start|>[get_weather(city="Paris"), get_time(tz="CET")]<|tool_call_end|>
and tool results come back in a `tool` role turn. Calls are parsed with Python's `ast` (never eval):
only a call (or list of calls) of a plain or dotted name with keyword arguments whose values are
literals (strings, numbers, booleans, None, lists, dicts, tuples) is accepted; anything else is
reported in `errors` and never executed.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field

BOS = "<|startoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TOOL_CALL_START, TOOL_CALL_END = "<|tool_call_start|>", "<|tool_call_end|>"
TOOL_LIST_START, TOOL_LIST_END = "<|tool_list_start|>", "<|tool_list_end|>"


def apply_chat_template(messages: list[dict], tools: list | None = None, add_generation_prompt: bool = True) -> str:
    """The prompt string for a list of {"role": ..., "content": ...} messages (roles: system, user,
    assistant, tool). `tools` (JSON-serialisable descriptions) go into the system turn."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    messages = list(messages)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"messages[{i}]['role'] must be system, user, assistant or tool, got {m['role']!r}")
    out = [BOS]
    system = None
    if messages and messages[0]["role"] == "system":
        system = str(messages[0]["content"])
        messages = messages[1:]
    if tools:
        listing = f"List of tools: {TOOL_LIST_START}{json.dumps(list(tools), ensure_ascii=False)}{TOOL_LIST_END}"
        system = listing if system is None else f"{system}\n{listing}"
    if system is not None:
        out.append(f"{IM_START}system\n{system}{IM_END}\n")
    for m in messages:
        out.append(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class ParsedReply:
    text: str  # the reply with the tool-call blocks removed
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # malformed calls: reported, never executed


def _dotted_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _parse_block(src: str) -> tuple[list[ToolCall], list[str]]:
    try:
        tree = ast.parse(src.strip(), mode="eval")
    except SyntaxError as exc:
        return [], [f"malformed tool call {src.strip()!r}: syntax error ({exc.msg})"]
    body = tree.body
    nodes = body.elts if isinstance(body, (ast.List, ast.Tuple)) else [body]
    calls, errors = [], []
    for node in nodes:
        text = ast.get_source_segment(src.strip(), node) or ast.dump(node)
        if not isinstance(node, ast.Call):
            errors.append(f"malformed tool call {text!r}: not a function call")
            continue
        name = _dotted_name(node.func)
        if name is None:
            errors.append(f"malformed tool call {text!r}: the callee must be a plain or dotted name")
            continue
        if node.args:
            errors.append(f"malformed tool call {text!r}: positional arguments are not allowed (use name=value)")
            continue
        args, bad = {}, None
        for kw in node.keywords:
            if kw.arg is None:
                bad = "**kwargs is not allowed"
                break
            try:
                args[kw.arg] = ast.literal_eval(kw.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                bad = f"argument {kw.arg!r} is not a literal value"
                break
        if bad:
            errors.append(f"malformed tool call {text!r}: {bad}")
            continue
        calls.append(ToolCall(name, args))
    return calls, errors


def parse_tool_calls(text: str) -> ParsedReply:
    """Split a model reply into plain text and the tool calls between the tool-call markers."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    calls, errors, plain = [], [], []
    pos = 0
    while True:
        start = text.find(TOOL_CALL_START, pos)
        if start < 0:
            plain.append(text[pos:])
            break
        plain.append(text[pos:start])
        end = text.find(TOOL_CALL_END, start)
        if end < 0:
            errors.append(f"unterminated tool call {text[start + len(TOOL_CALL_START):]!r}: no {TOOL_CALL_END}")
            break
        c, e = _parse_block(text[start + len(TOOL_CALL_START) : end])
        calls += c
        errors += e
        pos = end + len(TOOL_CALL_END)
    reply = "".join(plain).replace(IM_END, "").strip()
    return ParsedReply(reply, calls, errors)
