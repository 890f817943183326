"""Chat prompts and tool-call parsing for LFM2 / LFM2.5 models.

Prompts
-------
`encode_chat(tokenizer, messages, tools)` turns a conversation into token ids. When the tokenizer
carries the checkpoint's chat template (tokenizer_config.json `chat_template`, or
chat_template.jinja), transformers renders it (`tokenizer.apply_chat_template`); otherwise our
built-in template renders it, in one of two variants:

- "lfm2" (default): LFM2's template. The system turn holds the system prompt and, with tools,
  `List of tools: <|tool_list_start|>[...]<|tool_list_end|>` (each tool as JSON); an empty or
  missing system prompt without tools gives no system turn. Non-string content is JSON. Tool
  results are wrapped in `<|tool_response_start|>...<|tool_response_end|>`. Where LFM2's template
  has no rule (it fails on an assistant message without content and ignores `tool_calls`), we
  follow LFM2.5's.
- "lfm2.5": LFM2.5-8B-A1B's template. `List of tools: [...]` without the list markers; the system
  turn (always present) ends with a `Today's date: YYYY-MM-DD` line (template variable
  `date_string`, default today's local date); content blocks concatenated (text blocks as text,
  images as `<image>`, anything else as JSON); `<think>...</think>` dropped from assistant turns
  before the last user message (unless `preserve_thinking=True`); tool results unwrapped.

In both, an assistant message's `tool_calls` (`{"name", "arguments"}` or OpenAI's
`{"function": {...}}`) are written after its content the way the model writes them,
`<|tool_call_start|>[get_weather(city='Paris')]<|tool_call_end|>`, and its content may be absent.
`apply_chat_template` returns the built-in template's text.

Control tokens come only from the template, never from content: a user who types `<|im_end|>`
gets the characters of `<|im_end|>`, not the token. With the built-in template, the prompt is
tokenized as one text except that every control-token string inside content (messages, tools,
tool calls, the date) is cut out and encoded as plain text (`split_special_tokens`); ids are
identical to plain tokenization when content holds no control-token text, and a final check counts
the control tokens against the template's. With a checkpoint template, transformers'
`sanitize_control_tokens=True` does the same: control tokens in every string value are wrapped in
private-use markers before rendering, and encoded as plain text after it. transformers does not
mark dict keys, so a dict key holding control-token text is refused with a ValueError there.

Tool calls in a reply are parsed by `parse_tool_calls` (lfm_kernels/model/tool_calls.py, re-exported
here).
"""

from __future__ import annotations

import datetime
import json
import re

from .tool_calls import (  # noqa: F401 (parse_tool_calls and its limits are re-exported)
    IM_END,
    MAX_NESTING,
    MAX_PARSED_CHARS,
    TOOL_CALL_END,
    TOOL_CALL_START,
    ParsedReply,
    ToolCall,
    parse_tool_calls,
)

BOS = "<|startoftext|>"
EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
TOOL_LIST_START, TOOL_LIST_END = "<|tool_list_start|>", "<|tool_list_end|>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<|tool_response_start|>", "<|tool_response_end|>"
CONTROL_TOKENS = (
    BOS, EOT, IM_START, IM_END, TOOL_LIST_START, TOOL_LIST_END,
    TOOL_CALL_START, TOOL_CALL_END, TOOL_RESPONSE_START, TOOL_RESPONSE_END,
)
VARIANTS = ("lfm2", "lfm2.5")
ROLES = ("system", "user", "assistant", "tool")



# ----------------------------------------------------------------------------------------------
# rendering: a list of (text, is_content) parts, so the encoder knows which text the user wrote


def _tojson(x) -> str:
    # transformers' `tojson` filter: no ASCII escaping, default separators, keys in their order
    return json.dumps(x, ensure_ascii=False)


def _check_messages(messages, variant: str) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; a conversation needs at least one message")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            # the role is written into the template text, so it must be one of the known ones
            raise ValueError(f"messages[{i}]['role'] must be system, user, assistant or tool, got {m['role']!r}")
        # like transformers: a None value is a missing key
        m = {k: v for k, v in m.items() if v is not None}
        if "content" not in m and variant == "lfm2" and not (m["role"] == "assistant" and m.get("tool_calls")):
            raise ValueError(f"messages[{i}] has no 'content' (only an assistant message with tool_calls may omit it)")
        out.append(m)
    return out


def _py_value(v) -> str:
    """A tool-call argument the way LFM2.5 writes it: strings single-quoted, containers as JSON."""
    if isinstance(v, str):
        esc = v.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
        return f"'{esc}'"
    if isinstance(v, (dict, list, tuple)):
        return _tojson(v)
    return str(v)


def _tool_calls_text(tool_calls, where: str) -> str:
    if not isinstance(tool_calls, (list, tuple)):
        raise TypeError(f"{where}['tool_calls'] must be a list, got {type(tool_calls).__name__}")
    calls = []
    for j, tc in enumerate(tool_calls):
        if not isinstance(tc, dict):
            raise TypeError(f"{where}['tool_calls'][{j}] must be a dict, got {type(tc).__name__}")
        fn = tc["function"] if "function" in tc else tc
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"{where}['tool_calls'][{j}] needs a 'name' string (or 'function': {{'name', 'arguments'}})")
        args = fn.get("arguments")
        if isinstance(args, str):
            if args.strip() not in ("", "{}", "null"):
                raise ValueError(
                    f"{where}['tool_calls'][{j}]['arguments'] is a JSON string; pass a dict (json.loads it first)"
                )
            args = None
        if args is not None and not isinstance(args, dict):
            raise TypeError(f"{where}['tool_calls'][{j}]['arguments'] must be a dict, got {type(args).__name__}")
        body = ", ".join(f"{k}={_py_value(v)}" for k, v in (args or {}).items())
        calls.append(f"{fn['name']}({body})")
    return "[" + ", ".join(calls) + "]"


def _blocks_text(content) -> str:
    """LFM2.5's content rule: strings as they are, a dict as JSON, a list of blocks concatenated."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return _tojson(content)
    if isinstance(content, (list, tuple)):
        out = []
        for item in content:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict) and item.get("type") == "image":
                out.append("<image>")
            elif isinstance(item, dict) and item.get("type") == "text":
                out.append(str(item.get("text") or ""))
            else:
                out.append(_tojson(item))
        return "".join(out)
    return ""  # numbers and other scalars render nothing in LFM2.5's template


def _render_lfm2(messages, tools, add_generation_prompt):
    parts = [(BOS, False)]
    system = []
    if messages[0]["role"] == "system":
        c = messages[0].get("content", "")
        if c:
            system.append((c if isinstance(c, str) else _tojson(c), True))
        messages = messages[1:]
    if tools:
        if system:
            system.append(("\n", False))
        system.append(("List of tools: " + TOOL_LIST_START + "[", False))
        for k, t in enumerate(tools):
            if k:
                system.append((", ", False))
            system.append((t if isinstance(t, str) else _tojson(t), True))
        system.append(("]" + TOOL_LIST_END, False))
    if system:
        parts += [(IM_START + "system\n", False), *system, (IM_END + "\n", False)]
    for i, m in enumerate(messages):
        parts.append((IM_START + m["role"] + "\n", False))
        c = m.get("content", "")
        c = c if isinstance(c, str) else _tojson(c)
        if m["role"] == "tool":
            parts += [(TOOL_RESPONSE_START, False), (c, True), (TOOL_RESPONSE_END, False)]
        else:
            parts.append((c, True))
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = _tool_calls_text(m["tool_calls"], f"messages[{i}]")
            parts += [(TOOL_CALL_START, False), (calls, True), (TOOL_CALL_END, False)]
        parts.append((IM_END + "\n", False))
    if add_generation_prompt:
        parts.append((IM_START + "assistant\n", False))
    return parts


_CFM_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _render_lfm25(messages, tools, add_generation_prompt, date_string=None, preserve_thinking=False):
    parts = [(BOS, False)]
    system = []
    if messages[0]["role"] == "system":
        if messages[0].get("content"):
            s = _blocks_text(messages[0]["content"])
            if s:
                system.append((s, True))
        messages = messages[1:]
    if tools:
        if system:
            system.append(("\n", False))
        system.append(("List of tools: [", False))
        for k, t in enumerate(tools):
            if k:
                system.append((", ", False))
            system.append((t if isinstance(t, str) else _tojson(t), True))
        system.append(("]", False))
    if date_string is None:
        date_string = datetime.datetime.now().strftime("%Y-%m-%d")
    if system:
        system.append(("\n", False))
    system += [("Today's date: ", False), (str(date_string), True)]
    parts += [(IM_START + "system\n", False), *system, (IM_END + "\n", False)]
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    for i, m in enumerate(messages):
        parts.append((IM_START + m["role"] + "\n", False))
        if m["role"] != "assistant":
            if m.get("content"):
                parts.append((_blocks_text(m["content"]), True))
            parts.append((IM_END + "\n", False))
            continue
        keep = bool(preserve_thinking) or i > last_user
        thinking = m.get("thinking") or m.get("reasoning") or m.get("reasoning_content")
        if isinstance(thinking, str) and thinking and keep:
            parts += [("<think>", False), (thinking, True), ("</think>", False)]
        content = _blocks_text(m["content"]) if m.get("content") else ""
        if not keep and "</think>" in content:
            content = content.split("</think>")[-1].strip()
        cfm = content.endswith(_CFM_TAG)
        if cfm:
            content = content[: len(content) - len(_CFM_TAG)]
        parts.append((content, True))
        if m.get("tool_calls"):
            calls = _tool_calls_text(m["tool_calls"], f"messages[{i}]")
            parts += [(TOOL_CALL_START, False), (calls, True), (TOOL_CALL_END, False)]
        if cfm:
            parts.append((_CFM_TAG, False))
        parts.append((IM_END + "\n", False))
    if add_generation_prompt:
        parts.append((IM_START + "assistant\n", False))
    return parts


def _render(messages, tools, add_generation_prompt, variant, template_kwargs):
    msgs = _check_messages(messages, variant)
    if tools is not None and not isinstance(tools, (list, tuple)):
        raise TypeError(f"tools must be a list of JSON-serialisable tool descriptions, got {type(tools).__name__}")
    known = {"lfm2": set(), "lfm2.5": {"date_string", "preserve_thinking"}}[variant]
    unknown = set(template_kwargs) - known
    if unknown:
        raise TypeError(f"the built-in {variant!r} template takes no option(s) {sorted(unknown)}; it knows {sorted(known)}")
    if variant == "lfm2":
        return _render_lfm2(msgs, tools, add_generation_prompt)
    return _render_lfm25(msgs, tools, add_generation_prompt, **template_kwargs)


def apply_chat_template(
    messages: list[dict],
    tools: list | None = None,
    add_generation_prompt: bool = True,
    *,
    variant: str = "lfm2",
    **template_kwargs,
) -> str:
    """The built-in template's prompt text for a list of {"role", "content"} messages (roles: system,
    user, assistant, tool). `tools` (JSON-serialisable descriptions or strings) go into the system
    turn. Text only: to get ids in which content cannot create control tokens, use `encode_chat`."""
    return "".join(text for text, _ in _render(messages, tools, add_generation_prompt, variant, template_kwargs))


# ----------------------------------------------------------------------------------------------
# encoding


def _added_tokens(tok) -> dict[str, tuple[int, bool]]:
    """content -> (id, special) of the tokenizer's added tokens."""
    dec = getattr(tok, "added_tokens_decoder", None) or {}
    return {t.content: (int(i), bool(t.special)) for i, t in dec.items()}


def _encode_piece(tok, text: str, plain: bool, first: bool, newline_ids: list[int]) -> list[int]:
    def enc(s):
        if plain:
            return list(tok.encode(s, add_special_tokens=False, split_special_tokens=True))
        return list(tok.encode(s, add_special_tokens=False))

    if first:
        return enc(text)
    # a piece from the middle of the prompt: encode it after a newline so that tokenizers that add a
    # prefix space at the start of a string (SentencePiece) don't, then drop the newline again
    ids = enc("\n" + text)
    if ids[: len(newline_ids)] == newline_ids:
        return ids[len(newline_ids):]
    return enc(text)


def _encode_parts(tok, parts) -> list[int]:
    added = _added_tokens(tok)
    control = {s for s, (_, special) in added.items() if special} | set(CONTROL_TOKENS)
    control_ids = {added[s][0] for s in control if s in added}
    control_re = re.compile("|".join(map(re.escape, sorted(control, key=len, reverse=True))))
    # cut every control-token string in content out of the text: those pieces are encoded as plain text
    pieces, buf, expected = [], [], 0
    for text, is_content in parts:
        if not text:
            continue
        if not is_content:
            buf.append(text)
            expected += sum(1 for m in control_re.finditer(text) if m.group() in added)
            continue
        pos = 0
        for m in control_re.finditer(text):
            buf.append(text[pos : m.start()])
            pieces.append(("".join(buf), False))
            pieces.append((m.group(), True))
            buf, pos = [], m.end()
        buf.append(text[pos:])
    pieces.append(("".join(buf), False))
    newline_ids = list(tok.encode("\n", add_special_tokens=False))
    ids: list[int] = []
    for text, plain in pieces:
        if not text:
            continue
        piece_ids = _encode_piece(tok, text, plain, not ids, newline_ids)
        if plain and control_ids.intersection(piece_ids):
            raise ValueError(f"cannot encode {text!r} as plain text: this tokenizer produces its control token from text")
        ids += piece_ids
    found = sum(1 for t in ids if t in control_ids)
    if found != expected:  # cannot happen unless the tokenizer merges text into control tokens
        raise RuntimeError(f"prompt has {found} control tokens, the template wrote {expected}")
    return ids


def _check_keys(obj, where: str, control_re) -> None:
    """Refuse dict keys that hold control-token text (transformers only sanitizes values)."""
    stack = [(obj, where)]
    while stack:
        o, w = stack.pop()
        if isinstance(o, dict):
            for k, v in o.items():
                if isinstance(k, str) and control_re.search(k):
                    raise ValueError(f"{w} has a key with control-token text {k!r}; keys cannot be sanitized")
                stack.append((v, f"{w}[{k!r}]"))
        elif isinstance(o, (list, tuple)):
            stack.extend((v, f"{w}[{i}]") for i, v in enumerate(o))


def _has_template(tok) -> bool:
    """Whether tok carries a chat template that transformers can render with sanitized content."""
    if not (getattr(tok, "chat_template", None) and hasattr(tok, "apply_chat_template")):
        return False
    import inspect

    if "sanitize_control_tokens" in inspect.signature(tok.apply_chat_template).parameters:
        return True
    # an older transformers would pass the flag on to the template and tokenize content's control
    # tokens as control tokens: the built-in template is the safe choice there
    import warnings

    warnings.warn("this transformers cannot keep control tokens out of chat content; using the built-in "
                  "chat template instead of the checkpoint's (transformers >= 5.24 uses the checkpoint's)",
                  stacklevel=3)
    return False


def encode_chat(
    tokenizer,
    messages: list[dict],
    tools: list | None = None,
    add_generation_prompt: bool = True,
    *,
    variant: str = "lfm2",
    **template_kwargs,
) -> list[int]:
    """Token ids of the prompt for `messages`, in which only the template writes control tokens.

    With the tokenizer's own chat template (transformers), `template_kwargs` are its variables;
    without one, the built-in template `variant` ("lfm2" or "lfm2.5") renders it. See the module
    docstring for how content is kept from producing control tokens."""
    if _has_template(tokenizer):
        _check_messages(messages, "lfm2.5")  # types and roles; the checkpoint's template decides the rest
        added = _added_tokens(tokenizer)
        control = {s for s, (_, special) in added.items() if special} | set(CONTROL_TOKENS)
        control_re = re.compile("|".join(map(re.escape, control)))
        _check_keys(messages, "messages", control_re)
        _check_keys(tools, "tools", control_re)
        _check_keys(template_kwargs, "template_kwargs", control_re)
        ids = tokenizer.apply_chat_template(
            list(messages), tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True,
            return_dict=False, sanitize_control_tokens=True, **template_kwargs,
        )
        return [int(t) for t in ids]
    parts = _render(messages, tools, add_generation_prompt, variant, template_kwargs)
    return _encode_parts(tokenizer, parts)
