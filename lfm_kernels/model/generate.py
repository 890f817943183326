"""Token generation: prefill, then one token at a time with greedy or sampled decoding.

Logits processing follows transformers' generate, in its order, on float32 logits:
repetition penalty (every token already in the row: prompt and generated; a positive logit is
divided by the penalty, a negative one multiplied), then (sampling only) temperature, top-k, top-p,
softmax and a multinomial draw. Greedy (temperature=0) takes the argmax *after* the repetition
penalty, as transformers does; pass repetition_penalty=1.0 for the plain argmax. Unlike transformers
with left padding, pads never count as seen tokens.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Callable

import torch

from .. import _backend
from .chat import ParsedReply, encode_chat, parse_tool_calls


def process_logits(
    logits: torch.Tensor,
    seen: torch.Tensor | None,
    temperature: float,
    top_k: int | None,
    top_p: float,
    repetition_penalty: float,
) -> torch.Tensor:
    """logits [B, V] float32 -> scores ready for argmax (temperature 0) or softmax."""
    if repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature == 0:
        return logits
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def _penalise(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> None:
    """transformers' RepetitionPenaltyLogitsProcessor in place, touching only the tokens in history
    [B, n] (duplicates are harmless: every copy of an id writes the same value)."""
    vals = scores.gather(1, history)
    scores.scatter_(1, history, torch.where(vals < 0, vals * penalty, vals / penalty))


# A decode step's top-k over 128,000 logits took 0.25 ms in torch.topk (1.2 ms inside generate, its
# caches cold after the weight streams): 2-3% of a quantized token. _topk reads the row once for the
# maxima of blocks of this many logits and then ranks only the k best blocks' elements.
_TOPK_BLOCK = 64


def _topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(scores, k, dim=-1) for scores [B, V] (on the CPU, blocked): the same values in the same (descending)
    order, the same ids except which of the tokens tied at the k-th value are kept (torch.topk does
    not promise that either).

    Exact because an element of the top k lies in one of the k blocks with the largest maxima: a block
    left out has k blocks at least as large, hence k other elements at least as large as anything in
    it (ties at the k-th value aside, which still fill the k places with that value)."""
    B, V = scores.shape
    nb = V // _TOPK_BLOCK
    # (vocabularies are multiples of 64; the gain was measured on the CPU only)
    if V % _TOPK_BLOCK or nb <= 2 * k or not scores.is_contiguous() or scores.device.type != "cpu":
        return torch.topk(scores, k, dim=-1)
    blocks = scores.view(B, nb, _TOPK_BLOCK)
    best = torch.topk(blocks.amax(-1), k, dim=-1).indices  # [B, k]
    cand = blocks.gather(1, best[..., None].expand(B, k, _TOPK_BLOCK)).view(B, k * _TOPK_BLOCK)
    vals, j = torch.topk(cand, k, dim=-1)
    ids = best.gather(1, torch.div(j, _TOPK_BLOCK, rounding_mode="floor")) * _TOPK_BLOCK + j % _TOPK_BLOCK
    return vals, ids


def candidate_probs(
    logits: torch.Tensor,
    history: torch.Tensor | None,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, k], probs [B, k]): the top-k candidates and their sampling probabilities.

    The same distribution as softmax(process_logits(...)) over the full vocabulary (which is zero
    outside the top k), but only one full-vocabulary pass (topk) per step instead of half a dozen:
    the penalty touches only the seen ids and temperature/top-p/softmax run on k values. (A tie at the
    k-th value keeps exactly k tokens here, all tied tokens in transformers.)"""
    scores = logits.float()
    if scores is logits:
        scores = scores.clone()
    if repetition_penalty != 1.0 and history is not None and history.numel():
        _penalise(scores, history, repetition_penalty)
    vals, ids = _topk(scores, top_k)  # descending
    vals = vals / temperature
    if top_p < 1.0:
        asc = vals.flip(-1)
        remove = asc.softmax(-1).cumsum(-1) <= (1 - top_p)
        remove[..., -1:] = False
        vals = vals.masked_fill(remove.flip(-1), float("-inf"))
    return ids, vals.softmax(-1)


def sample_next(
    logits: torch.Tensor,
    history: torch.Tensor | None,
    temperature: float = 0.2,
    top_k: int | None = 80,
    top_p: float = 1.0,
    repetition_penalty: float = 1.05,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B] (int64) from logits [B, V]; history [B, n] holds the ids seen so far (prompt
    and generated) for the repetition penalty.

    On the CPU (with the compiled extension) greedy and top-k sampling are one C++ op
    (csrc/sampling.cpp): the same penalty, temperature, top-p and distribution, drawn with one uniform
    number per row from `generator` (reproducible per seed, but not torch.multinomial's draws: a seed
    picks other tokens than on other devices); among tokens tied at the k-th score it keeps the lower
    ids (torch.topk promises no order); greedy picks torch.argmax's token."""
    V = logits.shape[-1]
    if _sampler_op(logits, history) and (temperature == 0 or (top_k is not None and 0 < top_k < V)):
        return torch.ops.lfm_kernels_cpu.sample_top_k(logits, history, float(temperature), int(top_k or 1),
                                                      float(top_p), float(repetition_penalty), generator)
    if temperature != 0 and top_k is not None and 0 < top_k < V:
        ids, probs = candidate_probs(logits, history, temperature, top_k, top_p, repetition_penalty)
        pick = torch.multinomial(probs, 1, generator=generator)
        return ids.gather(1, pick)[:, 0]
    scores = logits.float()
    if scores is logits:
        scores = scores.clone()
    if repetition_penalty != 1.0 and history is not None and history.numel():
        _penalise(scores, history, repetition_penalty)
    if temperature == 0:
        return scores.argmax(dim=-1)
    scores = process_logits(scores, None, temperature, top_k, top_p, 1.0)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[:, 0]


def _sampler_op(logits: torch.Tensor, history: torch.Tensor | None) -> bool:
    return (logits.device.type == "cpu" and logits.dim() == 2 and _backend.cpu_extension_available()
            and hasattr(torch.ops.lfm_kernels_cpu, "sample_top_k")
            and (history is None or (history.dim() == 2 and history.dtype == torch.int64)))


def _real(name: str, value) -> float:
    """A real number that is not NaN (TypeError for a str, bool or tensor; ValueError for NaN)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got NaN")
    return value


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty):
    if not _is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__} {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    temperature = _real("temperature", temperature)
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and not _is_int(top_k):
        raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__} {top_k!r}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 or None (0/None = off), got {top_k}")
    top_p = _real("top_p", top_p)
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    repetition_penalty = _real("repetition_penalty", repetition_penalty)
    if not 0 < repetition_penalty < math.inf:
        raise ValueError(f"repetition_penalty must be finite and > 0, got {repetition_penalty}")


def _as_rows(model, inputs, attention_mask=None) -> tuple[list[list[int]], bool]:
    """Prompts as lists of token ids, and whether they came as text. With an attention_mask [B, T]
    (transformers-style padded ids, left or right), each row keeps only its positions where it is 1.
    Every prompt must hold at least one token and every id must lie in the model's vocabulary (ids a
    tokenizer produces included): a ValueError naming the prompt otherwise; no prompts at all (a batch
    of 0) is a ValueError too."""
    if attention_mask is not None:
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2:
            raise ValueError("attention_mask needs ids as a LongTensor [B, T]")
        mask = torch.as_tensor(attention_mask)
        if tuple(mask.shape) != tuple(inputs.shape):
            raise ValueError(f"attention_mask must have the shape of ids {tuple(inputs.shape)}, got {tuple(mask.shape)}")
        inputs = [row[m != 0].tolist() for row, m in zip(inputs.cpu(), mask.cpu())]
    if isinstance(inputs, str):
        inputs = [inputs]
    is_text = isinstance(inputs, (list, tuple)) and bool(inputs) and all(isinstance(s, str) for s in inputs)
    if is_text:
        for b, s in enumerate(inputs):
            if not s:
                raise ValueError(f"inputs: prompt {b} is empty text; every prompt needs at least one token")
        tok = _need_tokenizer(model)
        rows = [list(tok.encode(s)) for s in inputs]
    elif isinstance(inputs, torch.Tensor):
        if inputs.dtype == torch.bool or inputs.is_floating_point() or inputs.is_complex() or inputs.dim() not in (1, 2):
            raise ValueError(f"ids must be an integer tensor [T] or [B, T], got {inputs.dtype} {tuple(inputs.shape)}")
        if inputs.dim() == 2 and inputs.shape[0] == 0:
            raise ValueError(f"inputs: a batch of 0 prompts (ids of shape {tuple(inputs.shape)}); pass at least one")
        rows = inputs.tolist() if inputs.dim() == 2 else [inputs.tolist()]
    elif isinstance(inputs, (list, tuple)) and inputs and all(_is_int(t) for t in inputs):
        rows = [list(inputs)]
    elif isinstance(inputs, (list, tuple)) and inputs and all(isinstance(r, (list, tuple)) for r in inputs):
        rows = [list(r) for r in inputs]
        for b, r in enumerate(rows):
            if not all(_is_int(t) for t in r):
                raise TypeError(f"inputs: prompt {b} must hold int token ids, got {r[:5]!r}")
    elif isinstance(inputs, (list, tuple)) and not inputs:
        raise ValueError("inputs: a batch of 0 prompts (an empty list); pass at least one")
    else:
        raise TypeError(
            "inputs must be a str, a list of str, a LongTensor [B, T] or [T], or a list of token-id lists"
        )
    rows = [[int(t) for t in r] for r in rows]
    V = model.config.vocab_size
    source = "the tokenizer gave" if is_text else "has"
    for b, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompt {b} is empty; every prompt needs at least one token")
        bad = [t for t in r if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt {b}: {source} token ids outside the model's vocabulary [0, {V}): {bad[:5]}")
    return rows, is_text


def _need_tokenizer(model):
    if model.tokenizer is None:
        raise ValueError(
            "text prompts need a tokenizer, and this model has none (its directory has no tokenizer files); "
            "pass token ids instead"
        )
    return model.tokenizer


def eos_ids(model, eos_token_id=None) -> list[int]:
    """The stop ids: eos_token_id (an int or a list/tuple of ints; a str or float is a TypeError), or the
    defaults from the config, generation_config.json and the tokenizer."""
    if eos_token_id is not None:
        if isinstance(eos_token_id, torch.Tensor) and not (eos_token_id.is_floating_point() or eos_token_id.is_complex()):
            eos_token_id = eos_token_id.tolist()
        ids = [eos_token_id] if _is_int(eos_token_id) else eos_token_id
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) for t in ids):
            raise TypeError(f"eos_token_id must be an int or a list of ints, got {type(eos_token_id).__name__} {eos_token_id!r}")
        if any(t < 0 for t in ids):
            raise ValueError(f"eos_token_id must hold non-negative token ids, got {list(ids)}")
        return [int(t) for t in ids]
    ids = list(model.generation_defaults.get("eos_token_id", model.config.eos_token_id))
    tok = model.tokenizer
    if tok is not None and getattr(tok, "eos_token_id", None) is not None and tok.eos_token_id not in ids:
        ids.append(int(tok.eos_token_id))
    return ids


_INITIAL_ROOM = 256  # new-token positions allocated up front; the state doubles when they run out
# A state's length is rounded up to this many positions, so that the next call, a few tokens longer
# or shorter, can reuse it (and its recorded decode graph).
_STATE_ALIGN = 64
_SPARE_MAX_BYTES = 64 << 20  # a larger state (a long generation's KV caches) is freed, not kept


def _decode_state(model, batch: int, need: int, cuda_graph: bool, cpu_graph: bool):
    """A zeroed decode state of at least `need` positions and its stepper: the model's spare from the
    previous generate call when it fits, else new ones.

    Recording a CPU graph costs two eager steps (about two tokens' time at full size, every call, the
    chat's every turn), capturing a CUDA graph more: a state kept with its stepper is recorded once.
    A reused state is zeroed, so it is exactly a new one; the spare is taken under a lock, so
    concurrent calls on one model never share it (the second makes its own)."""
    from .cuda_graph import decode_stepper

    key = (batch, bool(cuda_graph), bool(cpu_graph))
    with model._spare_lock:
        spare = model._spare_decode
        fits = spare is not None and spare[0] == key and spare[1].max_len >= need
        if fits:
            model._spare_decode = None
    if fits:
        _, state, step_fn = spare
        step_fn.model = model  # the spare held it weakly (see _keep_spare)
        with torch.inference_mode():  # a grown state's buffers were made in inference mode
            for t in state.buffers():
                t.zero_()
        reset = getattr(step_fn, "reset", None)
        if reset is not None:
            reset()
        return state, step_fn
    max_len = min(model.config.max_position_embeddings, -(-need // _STATE_ALIGN) * _STATE_ALIGN)
    state = model.new_state(batch, max_len)
    return state, decode_stepper(model, state, cuda_graph, cpu_graph)


def _keep_spare(model, state, step_fn, cuda_graph: bool, cpu_graph: bool) -> None:
    """Keeps a recorded / captured stepper and its state with the model. The stepper refers to the
    model; kept so, it would make a reference cycle, and a dropped model (17 GB in bf16) would wait for
    the cycle collector instead of being freed at once: the kept stepper refers to it weakly."""
    if state.nbytes() > _SPARE_MAX_BYTES or not hasattr(step_fn, "model"):
        return  # (the eager stepper records nothing: nothing to keep)
    step_fn.model = weakref.proxy(model)
    with model._spare_lock:
        model._spare_decode = ((state.batch, bool(cuda_graph), bool(cpu_graph)), state, step_fn)


def _grow_last(t: torch.Tensor, size: int, fill: int) -> torch.Tensor:
    """t [B, n] extended to [B, size] (the new columns hold fill)."""
    new = torch.full((t.shape[0], size), fill, dtype=t.dtype, device=t.device)
    new[:, : t.shape[1]] = t
    return new


def _grow_state(model, state, max_len: int) -> None:
    """Lengthen a decode state's KV caches to max_len positions in place (the conv states do not depend
    on the length). One layer's cache is copied at a time, so the peak is one layer's worth extra."""
    if max_len <= state.max_len:
        return
    for caches in (state.k_cache, state.v_cache):
        for i, c in caches.items():
            grown = c.new_zeros(c.shape[0], c.shape[1], max_len, c.shape[3])
            grown[:, :, : state.max_len] = c
            caches[i] = grown
    state.max_len = max_len
    model._rope_tables(max_len)


def generate(
    model,
    inputs,
    max_new_tokens: int = 128,
    temperature: float = 0.2,
    top_k: int | None = 80,
    top_p: float = 1.0,
    repetition_penalty: float = 1.05,
    eos_token_id: int | list[int] | None = None,
    callback: Callable[[int, int], None] | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    timings: dict | None = None,
    attention_mask: torch.Tensor | None = None,
    cuda_graph: bool = True,
    cpu_graph: bool = True,
):
    """Generate up to max_new_tokens per prompt.

    inputs: token ids (LongTensor [B, T] or [T], or a list of id lists of different lengths) or text
        (a str or list of str; needs the checkpoint's tokenizer).
    eos_token_id: stop tokens (default: config / generation_config.json / tokenizer); [] never stops.
    callback(row, token_id): called for every generated token as soon as it is chosen (streaming);
        a row that has finished gets no more calls.
    seed / generator: for reproducible sampling.
    attention_mask: for transformers-style padded ids [B, T] (left or right padding): 1 = real token.
    max_new_tokens is capped so that prompt + new tokens fit the model's context
    (max_position_embeddings); generation stops there. The decode state is not allocated for
    max_new_tokens up front: it starts with room for 256 new tokens and doubles when that runs out,
    so memory follows the tokens actually generated. The state and its recorded CPU graph (or
    captured CUDA graph) stay with the model after the call (when at most 64 MiB) and the next call
    with the same batch size whose prompt + min(max_new_tokens, 256) fits them reuses them, zeroed:
    the same tokens, without recording the decode step again.
    Bad arguments (an empty prompt or batch, ids outside the vocabulary, a NaN or non-numeric
    temperature/top_p/repetition_penalty, a non-int top_k/max_new_tokens/eos_token_id) raise a
    ValueError or TypeError naming the argument.
    timings: a dict to receive {"prefill_s", "decode_s", "prompt_tokens", "decode_steps", "decode_path"}
        (decode_path: how the decode steps ran: "cuda graph", "cpu graph (N calls replayed)", "eager", or
        "eager (cpu graph refused: why)").
    cuda_graph: on CUDA, capture the decode step once as a CUDA graph and replay it (see cuda_graph.py).
    cpu_graph: on the CPU, record the decode step's op calls (twice) and replay them from C++ (see
        cpu_graph.py); the same bits, less interpreter time per token.

    Returns, for id inputs, the new ids only as a LongTensor [B, new] where new is the longest row's
    count; a row that stopped on an end-of-sequence token keeps that token and is padded after it with
    pad_token_id (or its eos id when the config has no pad id). For text inputs, a list of str (the
    decoded new tokens, special tokens kept so tool calls stay visible).
    """
    import time

    _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    if seed is not None and not _is_int(seed):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    rows, is_text = _as_rows(model, inputs, attention_mask)
    B = len(rows)
    lengths = [len(r) for r in rows]
    T = max(lengths)
    max_pos = model.config.max_position_embeddings
    if T >= max_pos:
        raise ValueError(
            f"inputs: the longest prompt has {T} tokens; the model's context (max_position_embeddings) "
            f"is {max_pos}, so a prompt may hold at most {max_pos - 1}"
        )
    # prompt + new tokens never exceed the model's context; generation ends there
    max_new_tokens = min(max_new_tokens, max_pos - T)
    dev = model.device
    stops = eos_ids(model, eos_token_id)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else (stops[0] if stops else 0)
    if generator is None and seed is not None:
        generator = torch.Generator(device=dev)
        generator.manual_seed(seed)

    ids = torch.full((B, T), pad, dtype=torch.int64)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.int64)
    ids = ids.to(dev)
    lens = torch.tensor(lengths, dtype=torch.int64, device=dev)
    # Room for new tokens grows on demand (doubling), so a large max_new_tokens costs nothing until
    # the tokens are actually generated.
    state, step_fn = _decode_state(model, B, T + min(max_new_tokens, _INITIAL_ROOM), cuda_graph, cpu_graph)
    room = state.max_len - T

    # token history for the repetition penalty: pads repeat the row's first token (a no-op duplicate)
    hist = torch.empty(B, T + room, dtype=torch.int64)
    for b, r in enumerate(rows):
        hist[b, :T] = r[0]
        hist[b, : len(r)] = torch.tensor(r, dtype=torch.int64)
    hist = hist.to(dev)
    stop_t = torch.tensor(stops, dtype=torch.int64, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    # Each tensor op here runs on caches the decode step's weight streams have just evicted (tens of
    # microseconds each on a CPU): the loop makes as few as it can. The new tokens are read back from
    # hist at the end, and a finished row's pad is applied only once some row has finished.
    any_finished = False

    t0 = time.perf_counter()
    logits = model.prefill(ids, lens, state)
    t1 = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for step in range(max_new_tokens):
            if step == room:
                room = min(max_new_tokens, 2 * room)
                _grow_state(model, state, T + room)
                hist = _grow_last(hist, T + room, 0)
            tok = sample_next(logits, hist[:, : T + step], temperature, top_k, top_p, repetition_penalty, generator)
            if any_finished:
                tok = torch.where(finished, torch.full_like(tok, pad), tok)
            n = step + 1
            if callback is not None:
                done = finished.tolist() if any_finished else [False] * B
                for b, t in enumerate(tok.tolist()):
                    if not done[b]:
                        callback(b, t)
            hist[:, T + step] = tok
            if stop_t.numel():
                finished |= torch.isin(tok, stop_t)
                if bool(finished.all()):
                    break
                if B > 1 and not any_finished:
                    any_finished = bool(finished.any())
            if step + 1 == max_new_tokens:
                break
            logits = step_fn(tok)
    t2 = time.perf_counter()
    _keep_spare(model, state, step_fn, cuda_graph, cpu_graph)
    if timings is not None:
        timings.update(prefill_s=t1 - t0, decode_s=t2 - t1, prompt_tokens=sum(lengths), decode_steps=n - 1, batch=B,
                       decode_path=getattr(step_fn, "path", "eager"))
    new = hist[:, T : T + n].cpu()
    if not is_text:
        return new
    tok = model.tokenizer
    texts = []
    for b in range(B):
        r = new[b].tolist()
        for i, t in enumerate(r):
            if t in stops:
                r = r[:i]
                break
        texts.append(tok.decode(r, skip_special_tokens=False))
    return texts


def chat(model, messages, tools=None, max_new_tokens: int = 512, chat_template_kwargs=None, **kwargs) -> ParsedReply:
    """One assistant turn: template, generate, parse tool calls (never executed here).
    chat_template_kwargs go to `encode_chat` (the checkpoint template's variables, or the built-in
    template's `variant` and options); the other kwargs to `generate`."""
    tok = _need_tokenizer(model)
    ids = encode_chat(tok, messages, tools, add_generation_prompt=True, **(chat_template_kwargs or {}))
    new = generate(model, [ids], max_new_tokens, **kwargs)[0].tolist()
    stops = eos_ids(model, kwargs.get("eos_token_id"))
    for i, t in enumerate(new):
        if t in stops:
            new = new[:i]
            break
    return parse_tool_calls(tok.decode(new, skip_special_tokens=False))
