"""End-to-end benchmark: prefill and decode tokens/s of lfm_kernels.model on the LFM2.5-8B-A1B-shaped
default (seeded random weights, no download), or on a model given to it (`lfm-kernels bench --e2e
--model FILE`: a .gguf file or a checkpoint directory), beside this machine's floor and
transformers eager on the *same* weights (float weights only: transformers has no kernels for the
quantized blocks).

floor tokens/s = read bandwidth measured in the same run (the mean of a probe before and one after the
timed generation) / bytes of weights one decoded token reads
(all non-expert weights, the top_k of E experts per MoE layer, the tied lm_head; one embedding row).

On the CPU a second, paired figure follows the timed generation: `paired_steps` more decode steps
(the same stepper generate() uses), each timed right after a read probe of the same buffer, and each
step's share of the floor taken against the probe just before it; the row keeps their median
("decode_vs_paired_floor"). A VM's bandwidth can flip between two states within seconds (1.6x apart
on the 2-core Zen 5 these kernels were last tuned on); the before/after mean then mixes states, while a
probe a few milliseconds before each step reads in the step's own state.
transformers runs on our tensors (its parameters are views of ours, built on the meta device): the
full model is about 17 GB in bf16 and two copies would not fit in 24 GiB.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from .. import _backend
from .core import extension_read_probes, measure_read_bandwidth, read_probe_buffer


def _row(impl, cfg, prompt_len, new_tokens, threads, dtype, prefill_s, decode_s, steps, bw, nbytes, weights="bf16",
         extra=None):
    floor = bw / nbytes
    decode = steps / decode_s if decode_s > 0 and steps > 0 else float("nan")
    return {
        "impl": impl,
        "weights": weights,
        **(extra or {}),
        "num_layers": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": threads,
        "batch": 1,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_s": prefill_s,
        "prefill_tok_s": prompt_len / prefill_s,
        "decode_s": decode_s,
        "decode_tok_s": decode,
        "bandwidth_GBs": bw / 1e9,
        "bytes_per_token": nbytes,
        "floor_tok_s": floor,
        "decode_vs_floor": decode / floor,
    }


def _paired_decode(model, nbytes: int, steps: int, warmup: int = 4, probes=None, probe_bytes: int | None = None) -> dict:
    """Decode steps on a fresh state (batch 1, the stepper generate() uses), each right after a read
    probe: {"decode_vs_paired_floor": the median over steps of (bytes / probe rate) / step time,
    "paired_bandwidth_GBs": the probes' median, "paired_share_range": [min, max] of the shares,
    "paired_steps", "paired_path": how the steps ran}. The probe reads the bytes per token, clamped to
    [256 MiB, 1 GiB], on huge pages as the weights sit, and takes the faster of the extension's read
    without and with software prefetch (as measure_read_bandwidth, less torch's slower amax).
    `probes` (callables, each reading `probe_bytes`) replace the read probe in tests."""
    from .. import model as _model
    from ..model.generate import _STATE_ALIGN

    if probes is None:
        # at least 256 MiB: a small model's bytes per token would fit the last-level cache
        buf = read_probe_buffer(min(max(nbytes, 256 << 20), 1 << 30))
        probe_bytes = buf.nbytes
        probes = extension_read_probes(buf)
    for probe in probes:
        probe()
    need = -(-(warmup + steps) // _STATE_ALIGN) * _STATE_ALIGN
    state = model.new_state(1, min(model.config.max_position_embeddings, need))
    step = _model.decode_stepper(model, state)
    tok = torch.zeros(1, dtype=torch.int64, device=model.device)
    for _ in range(warmup):  # the CPU graph records its first two steps
        step(tok)
    shares, rates = [], []
    for _ in range(steps):
        best = float("inf")
        for probe in probes:
            t0 = time.perf_counter()
            probe()
            best = min(best, time.perf_counter() - t0)
        t0 = time.perf_counter()
        step(tok)
        dt = time.perf_counter() - t0
        rate = probe_bytes / best
        rates.append(rate)
        shares.append(nbytes / rate / dt)
    return {"decode_vs_paired_floor": statistics.median(shares), "paired_bandwidth_GBs": statistics.median(rates) / 1e9,
            "paired_share_range": [min(shares), max(shares)], "paired_steps": steps,
            "paired_path": getattr(step, "path", "eager")}


def _time_transformers(hf, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, int]:
    """transformers' own cache and forward: one prefill call, then one greedy token per call."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf(ids, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = hf(tok, cache=cache, use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t3 = time.perf_counter()
    return t1 - t0, t3 - t2, new_tokens - 1


def run_e2e(
    num_layers: int = 24,
    prompt_len: int = 128,
    new_tokens: int = 64,
    threads: int | None = None,
    compare_transformers: bool = True,
    progress: Callable[[str], None] | None = print,
    dtype: torch.dtype = torch.bfloat16,
    vocab_size: int = 128_000,
    seed: int = 0,
    transformers_new_tokens: int | None = None,
    model=None,
    quant: str | None = None,
    paired_steps: int = 32,
) -> list[dict]:
    """Rows (dicts) for lfm_kernels and, if asked, transformers eager: prefill tokens/s of a
    prompt_len-token prompt, decode tokens/s over new_tokens (batch 1), the floor and the bandwidth.
    `model` reuses an already built LfmModel instead of making the default (a loaded file: the row
    names it, `model.path`, and its weight formats). quant "q8_0" / "q4_0" / "q4_k_m" quantizes the
    default's weights (the same random values) and counts the floor on the quantized bytes;
    transformers has no kernels for these blocks, so a quantized model gets no transformers row.
    paired_steps: decode steps of the paired measurement (see the module docstring; CPU only, 0 for none)."""
    from ..model import default_model, to_transformers
    from ..model.weights import weight_formats

    say = progress or (lambda s: None)
    if threads is not None:
        torch.set_num_threads(int(threads))
    threads = torch.get_num_threads()
    if model is None:
        what = f"{dtype}" if quant is None else f"{quant} weights, {dtype} activations"
        say(f"building the LFM2.5-8B-A1B-shaped default: {num_layers} layers, {what}, random weights (seed {seed})")
        model = default_model(num_layers=num_layers, dtype=dtype, seed=seed, vocab_size=vocab_size, quant=quant)
    dtype_name = str(model.dtype).replace("torch.", "")
    formats = weight_formats(model.weights)
    extra = {"model": model.path if model.path else "default (random weights)"}
    if model.weights.is_quantized():
        total = sum(formats.values())
        # every format and its share of the weight bytes: a K-quant mix is not one format
        extra["weight_formats"] = ", ".join(f"{f} {100 * b / total:.1f}%" for f, b in formats.items())
        weights = quant or "+".join(f for f in formats if f not in ("float32", "bfloat16", "float16"))
    else:
        weights = dtype_name
    from .. import _memory

    storage = list(_weight_storage(model.weights)) if model.device.type == "cpu" else []
    share = _memory.huge_page_share(storage)
    if share is not None:
        extra["weights_on_huge_pages"] = f"{100 * share:.0f}%"
        # weights under 2 MiB never get a huge page; of the others, ~10% is tails on small pages
        big = _memory.huge_page_share([t for t in storage if t.numel() * t.element_size() >= _memory._MIN_BYTES])
        if big is not None and big < 0.8:
            say(f"only {100 * big:.0f}% of the weights of 2 MiB and up are on huge pages (transparent huge "
                "pages off, see /sys/kernel/mm/transparent_hugepage/enabled, or memory too fragmented for "
                "free 2 MiB pages): the decode reads the rest with a page walk every 4 KiB and runs slower")
    cfg = model.config
    nbytes = model.bytes_per_decoded_token(1)
    say(f"weights {model.weight_bytes() / 1e9:.2f} GB; one decoded token reads {nbytes / 1e9:.3f} GB")
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=gen)

    # the warm-up runs the timed prompt's shapes once: the first call of a shape class may time the
    # kernel paths (the chooser, up to its budget) and oneDNN builds its GEMMs for each new shape, both
    # once per process, so a warm-up of fewer tokens left them inside the timed prefill. Its 16 tokens
    # also hold a quantized model's decode trial of the x8 stream setting (lfm_kernels/_chooser.py,
    # DecodeStreamTrial: the two recordings, 10 timed replays, and two recordings again where the
    # choice changes the policy), which a first run on a machine makes once.
    say("warm-up")
    model.generate(ids, 16, eos_token_id=[], seed=seed)
    # The probe runs before and after the timed run and the floor takes their mean: a VM's bandwidth
    # can change by 1.8x within seconds and stay there (seen on the 2-core Zen 4 and Xeon VMs), and a
    # single probe taken in the other state than the run would make the share meaningless. Both
    # probes go into the row; when they disagree by more than 15% the share is flagged as unreliable.
    bw_before = measure_read_bandwidth()
    say(f"read bandwidth {bw_before / 1e9:.1f} GB/s -> floor {bw_before / nbytes:.2f} tokens/s")

    t: dict = {}
    model.generate(ids, new_tokens, eos_token_id=[], seed=seed, timings=t)  # model-card sampling defaults
    bw_after = measure_read_bandwidth()
    bw = (bw_before + bw_after) / 2
    extra = {**extra, "bandwidth_before_GBs": bw_before / 1e9, "bandwidth_after_GBs": bw_after / 1e9,
             "bandwidth_steady": abs(bw_after - bw_before) <= 0.15 * max(bw_before, bw_after)}
    say(f"read bandwidth after the run {bw_after / 1e9:.1f} GB/s; the floor takes the mean, {bw / 1e9:.1f} GB/s"
        + ("" if extra["bandwidth_steady"] else " (the machine's bandwidth changed during the run: the share is unreliable)"))
    extra["decode_path"] = t.get("decode_path", "eager")  # the CPU / CUDA graph, or eager and why
    paired = {}
    if paired_steps > 0 and model.device.type == "cpu" and _backend.cpu_extension_available():
        paired = _paired_decode(model, nbytes, paired_steps)
        lo, hi = paired["paired_share_range"]
        say(f"paired: {paired_steps} decode steps, each after a read probe: median {100 * paired['decode_vs_paired_floor']:.1f}% "
            f"of its floor (range {100 * lo:.0f}-{100 * hi:.0f}%, probes' median {paired['paired_bandwidth_GBs']:.1f} GB/s)")
    rows = [_row("lfm_kernels", cfg, prompt_len, new_tokens, threads, model.dtype, t["prefill_s"], t["decode_s"],
                 t["decode_steps"], bw, nbytes, weights=weights, extra=extra)]
    rows[-1].update(paired)  # ours only: the transformers row has no paired steps
    say(_fmt(rows[-1]))

    if compare_transformers and not model.weights.is_quantized():
        n = transformers_new_tokens or new_tokens
        hf = to_transformers(model, attn_implementation="eager", experts_implementation="eager")
        say("transformers eager (same weights): warm-up")
        _time_transformers(hf, ids, 2)  # the same warm-up as ours: the timed prompt's shapes once
        pre, dec, steps = _time_transformers(hf, ids, n)
        rows.append(_row("transformers-eager", cfg, prompt_len, n, threads, model.dtype, pre, dec, steps, bw, nbytes,
                         weights=dtype_name, extra=extra))
        say(_fmt(rows[-1]))
        ours, theirs = rows[0], rows[1]
        ours["decode_vs_transformers"] = ours["decode_tok_s"] / theirs["decode_tok_s"]
        ours["prefill_vs_transformers"] = ours["prefill_tok_s"] / theirs["prefill_tok_s"]
        del hf
    return rows


def _fmt(r: dict) -> str:
    return (
        f"{r['impl']:>20} {r['weights']:>5}: prefill {r['prompt_len']} tok {r['prefill_tok_s']:7.2f} tok/s | decode "
        f"{r['decode_tok_s']:6.2f} tok/s = {100 * r['decode_vs_floor']:5.1f}% of floor {r['floor_tok_s']:.2f} tok/s "
        f"({r['bandwidth_GBs']:.1f} GB/s, {r['bytes_per_token'] / 1e9:.3f} GB/token, {r['num_layers']} layers, "
        f"{r['threads']} threads)"
        + (f"; paired {100 * r['decode_vs_paired_floor']:.1f}% (median of {r['paired_steps']} steps, each against a "
           f"probe just before it)" if "decode_vs_paired_floor" in r else "")
    )


def _weight_storage(weights):
    """The tensors holding the weights' bytes (a quantized weight: its blocks; a split one: each part's)."""
    from ..quant import QuantizedTensor

    for _, t in weights.tensors():
        for part in getattr(t, "parts", (t,)):
            yield part.data if isinstance(part, QuantizedTensor) else part


if __name__ == "__main__":  # python -m lfm_kernels.benchmark.e2e [num_layers]
    import sys

    run_e2e(num_layers=int(sys.argv[1]) if len(sys.argv) > 1 else 24)
