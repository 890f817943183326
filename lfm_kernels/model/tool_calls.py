"""Tool-call parsing for LFM2 / LFM2.5 replies.

`parse_tool_calls(text)` splits a reply into plain text and the calls between `<|tool_call_start|>`
and `<|tool_call_end|>`. Accepted forms: Pythonic calls, `[get_weather(city="Paris"), f(x=1)]` or a
single call, with keyword arguments whose values are literals (strings, numbers, True/False/None and
JSON's true/false/null, lists, tuples, dicts, sets, a single leading minus on a number); and
LiquidAI's JSON form, `[{"name": "get_weather", "arguments": {"city": "Paris"}}]` or a bare object.
Anything else (calls, names, operators, attribute access inside arguments, positional arguments,
`**kwargs`) is reported in `errors` and never evaluated: values are read from the syntax tree, nothing
is executed. Parsing is linear in the length of the reply. At most `MAX_PARSED_CHARS` (256 KiB)
characters of a reply are searched for tool calls; the rest is kept as text and the cut is reported.
Nesting deeper than `MAX_NESTING` (32), long chains of unary operators or attribute accesses are
reported, never raised. A `<|tool_call_end|>` inside a quoted string argument does not end the
block; a block ends at the latest before the next `<|tool_call_start|>`.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field

TOOL_CALL_START, TOOL_CALL_END = "<|tool_call_start|>", "<|tool_call_end|>"
IM_END = "<|im_end|>"
MAX_PARSED_CHARS = 256 * 1024
MAX_NESTING = 32


@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class ParsedReply:
    text: str  # the reply with the tool-call blocks removed
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # malformed calls: reported, never executed


class _Bad(Exception):
    """A tool call that is not accepted; the message says why."""


_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_JSON_LITERALS = {"true": True, "false": False, "null": None}
_SNIPPET = 200


def _clip(s: str) -> str:
    return repr(s if len(s) <= _SNIPPET else s[:_SNIPPET] + "...")


class _Segments:
    """Source text of AST nodes by offsets (ast's columns count UTF-8 bytes), linear in the block,
    unlike ast.get_source_segment, which re-splits the whole source for every call."""

    def __init__(self, src: str):
        self.b = src.encode("utf-8")
        self.starts = [0] + [m.end() for m in re.finditer(rb"\n", self.b)]

    def __call__(self, node) -> str:
        try:
            a = self.starts[node.lineno - 1] + node.col_offset
            z = self.starts[node.end_lineno - 1] + node.end_col_offset
            return self.b[a : min(z, a + 4 * _SNIPPET)].decode("utf-8", "replace")
        except (AttributeError, IndexError, TypeError):
            return type(node).__name__


def _literal(node, depth: int = 0):
    """The value of a literal expression node; _Bad for anything else. No evaluation happens."""
    if depth > MAX_NESTING:
        raise _Bad(f"value nested deeper than {MAX_NESTING} levels")
    if isinstance(node, ast.Constant):
        if node.value is None or type(node.value) in (str, int, float, bool):
            return node.value
        raise _Bad(f"{type(node.value).__name__} values are not accepted")
    if isinstance(node, ast.Name) and node.id in _JSON_LITERALS:
        return _JSON_LITERALS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = node.operand
        if isinstance(v, ast.Constant) and type(v.value) in (int, float):
            return -v.value if isinstance(node.op, ast.USub) else v.value
        raise _Bad("a sign applies to one number only")
    if isinstance(node, ast.List):
        return [_literal(e, depth + 1) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_literal(e, depth + 1) for e in node.elts)
    if isinstance(node, ast.Set):
        out = [_literal(e, depth + 1) for e in node.elts]
        try:
            return set(out)
        except TypeError:
            raise _Bad("set elements must be hashable") from None
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if k is None:
                raise _Bad("** inside a dict is not allowed")
            key = _literal(k, depth + 1)
            try:
                out[key] = _literal(v, depth + 1)
            except TypeError:
                raise _Bad("dict keys must be hashable") from None
        return out
    raise _Bad(f"{type(node).__name__} is not a literal")


def _depth_ok(obj) -> bool:
    stack = [(obj, 0)]
    while stack:
        o, d = stack.pop()
        if d > MAX_NESTING:
            return False
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return True


def _call_from_mapping(obj) -> ToolCall:
    """LiquidAI's JSON form: {"name": "f", "arguments": {...}} (arguments may be a JSON string)."""
    if not isinstance(obj, dict):
        raise _Bad("not a function call")
    name = obj.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _Bad("'name' must be a plain or dotted name")
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise _Bad("'arguments' is a string that is not a JSON object") from None
    if args is None:
        args = {}
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise _Bad("'arguments' must be an object with string keys")
    if not _depth_ok(args):
        raise _Bad(f"value nested deeper than {MAX_NESTING} levels")
    return ToolCall(name, args)


def _no_constant(s):
    raise ValueError(f"{s} is not a JSON literal")


def _dotted_name(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):  # iterative: attribute chains can be long
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _call_from_node(node) -> ToolCall:
    if isinstance(node, ast.Dict):
        return _call_from_mapping(_literal(node))
    if not isinstance(node, ast.Call):
        raise _Bad("not a function call")
    name = _dotted_name(node.func)
    if name is None:
        raise _Bad("the callee must be a plain or dotted name")
    if node.args:
        raise _Bad("positional arguments are not allowed (use name=value)")
    args = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise _Bad("**kwargs is not allowed")
        try:
            args[kw.arg] = _literal(kw.value)
        except _Bad as exc:
            raise _Bad(f"argument {kw.arg!r} is not a literal value ({exc})") from None
    return ToolCall(name, args)


def _parse_block(src: str) -> tuple[list[ToolCall], list[str]]:
    s = src.strip()
    if not s:
        return [], ["malformed tool call '': empty"]
    if s[0] in "[{":
        try:
            obj = json.loads(s, parse_constant=_no_constant)
        except RecursionError:
            return [], [f"malformed tool call {_clip(s)}: nested too deeply"]
        except ValueError:
            pass  # not JSON: Pythonic calls
        else:
            calls, errors = [], []
            for item in obj if isinstance(obj, list) else [obj]:
                try:
                    calls.append(_call_from_mapping(item))
                except _Bad as exc:
                    try:
                        shown = json.dumps(item, ensure_ascii=False)
                    except (RecursionError, ValueError):
                        shown = type(item).__name__
                    errors.append(f"malformed tool call {_clip(shown)}: {exc}")
            return calls, errors
    try:
        tree = ast.parse(s, mode="eval")
    except SyntaxError as exc:
        return [], [f"malformed tool call {_clip(s)}: syntax error ({exc.msg})"]
    except (RecursionError, MemoryError):
        # CPython's parser gives up on long chains of unary operators or attribute accesses
        return [], [f"malformed tool call {_clip(s)}: nested too deeply"]
    except ValueError as exc:  # null bytes, integers longer than the conversion limit
        return [], [f"malformed tool call {_clip(s)}: {exc}"]
    body = tree.body
    nodes = body.elts if isinstance(body, (ast.List, ast.Tuple)) else [body]
    seg = _Segments(s)
    calls, errors = [], []
    for node in nodes:
        try:
            calls.append(_call_from_node(node))
        except _Bad as exc:
            errors.append(f"malformed tool call {_clip(seg(node))}: {exc}")
    return calls, errors


_OUTSIDE_RE = re.compile(r"'''|\"\"\"|'|\"|" + re.escape(TOOL_CALL_END))
_CLOSE_RE = {q: re.compile(r"\\.|" + re.escape(q), re.S) for q in ("'", '"', "'''", '"""')}


def _block_end(text: str, pos: int, limit: int) -> int:
    """Where the block starting at pos ends: the first TOOL_CALL_END outside a quoted string before
    limit, else the first one at all (a block with a stray quote), else -1. Scans [pos, limit) once."""
    i = pos
    while True:
        m = _OUTSIDE_RE.search(text, i, limit)
        if m is None:
            break
        if m.group() == TOOL_CALL_END:
            return m.start()
        close, j = _CLOSE_RE[m.group()], m.end()
        while True:
            c = close.search(text, j, limit)
            if c is None:
                return text.find(TOOL_CALL_END, pos, limit)
            j = c.end()
            if not c.group().startswith("\\"):
                break
        i = j
    return text.find(TOOL_CALL_END, pos, limit)


def parse_tool_calls(text: str, *, max_chars: int = MAX_PARSED_CHARS) -> ParsedReply:
    """Split a model reply into plain text and the tool calls between the tool-call markers. Only
    the first max_chars characters are searched for calls; malformed calls are reported in
    `errors`, nothing raises and nothing is executed."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 0:
        raise ValueError(f"max_chars must be an int >= 0, got {max_chars!r}")
    calls, errors, plain = [], [], []
    n = min(len(text), max_chars)
    if len(text) > n:
        errors.append(f"reply is {len(text)} characters; only the first {n} were searched for tool calls")
    pos = 0
    while True:
        start = text.find(TOOL_CALL_START, pos, n)
        if start < 0:
            plain.append(text[pos:])
            break
        plain.append(text[pos:start])
        body = start + len(TOOL_CALL_START)
        nxt = text.find(TOOL_CALL_START, body, n)
        limit = n if nxt < 0 else nxt
        end = _block_end(text, body, limit)
        if end < 0:
            errors.append(f"unterminated tool call {_clip(text[body:limit])}: no {TOOL_CALL_END}")
            if nxt < 0:
                plain.append(text[n:])
                break
            pos = nxt
            continue
        c, e = _parse_block(text[body:end])
        calls += c
        errors += e
        pos = end + len(TOOL_CALL_END)
    reply = "".join(plain).replace(IM_END, "").strip()
    return ParsedReply(reply, calls, errors)
