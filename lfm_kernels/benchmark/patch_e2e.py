"""End-to-end transformers tokens/s with and without `lfm_kernels.patch`, on CPU in bf16.

The model is transformers' own `Lfm2MoeForCausalLM` with LFM2.5-8B-A1B's shapes and the seeded random
weights of `lfm_kernels.model.default_model`, which it uses in place (`to_transformers`: its parameters
are views of those tensors), so it costs only the memory of the weights (about 17 GB at full depth).
`num_layers` keeps the real width but fewer layers (the first ones of the real layer pattern).

Prefill: one forward over `prompt_len` tokens into a fresh cache (as `generate()` does, only the last
position's logits). Decode: `new_tokens` single-token forwards against the cache, greedy; tokens/s is
steps over their time. The same model runs unpatched and after `lfm_kernels.patch(model)` in
alternating rounds (ABBA order), because this kind of machine's memory bandwidth drifts by up to 2x
over minutes: interleaving keeps such a drift out of the ratio. Reported: medians over the rounds,
and each round's ratio.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch

FULL_LAYERS = 24


def _prefill(model, ids):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], cache


@torch.inference_mode()
def _measure_once(model, ids, new_tokens: int) -> dict:
    """One prefill of `ids` into a fresh cache, then `new_tokens` greedy single-token steps, each timed."""
    prompt_len = ids.shape[1]
    t0 = time.perf_counter()
    logits, cache = _prefill(model, ids)
    prefill_s = time.perf_counter() - t0
    token = logits.argmax(-1, keepdim=True)
    tokens = [int(token)]
    pos = prompt_len
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(
            input_ids=token,
            cache=cache,
            use_cache=True,
            position_ids=torch.tensor([[pos]]),
        )
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
        pos += 1
    return {"prefill_s": prefill_s, "decode_s": time.perf_counter() - t0, "tokens": tokens}


def _summary(runs: list[dict], prompt_len: int, new_tokens: int) -> dict:
    prefill_s = statistics.median(r["prefill_s"] for r in runs)
    decode_s = statistics.median(r["decode_s"] for r in runs)
    return {
        "prefill_s": prefill_s,
        "prefill_tok_s": prompt_len / prefill_s,
        "decode_s": decode_s,
        "decode_tok_s": new_tokens / decode_s,
        "tokens": runs[0]["tokens"],
    }


def run_patch_bench(
    num_layers: int | None = None,
    prompt_len: int = 128,
    new_tokens: int = 32,
    progress: Callable[[str], None] | None = print,
    *,
    vocab_size: int = 128_000,
    seed: int = 0,
    rounds: int = 3,
    bandwidth: float | None = None,
) -> list[dict]:
    """Prefill and decode tokens/s of transformers' LFM2.5-8B-A1B-shaped model, unpatched vs patched (CPU, bf16).

    num_layers=None is the full 24-layer model (about 17 GB of bf16 weights); 2-4 gives a quick run at the
    real width. Returns one row per (phase, variant) with tokens/s and the speedup of patched over unpatched;
    decode rows also give the floor: weight bytes a token reads over this machine's read bandwidth
    (measured unless `bandwidth` in bytes/s is given); prefill rows give GFLOP/s (2 x active params x tokens).
    `rounds` alternating rounds of each variant (one prefill + the decode each); figures are their medians.
    """
    import lfm_kernels
    from lfm_kernels import _backend

    say = progress or (lambda _msg: None)
    from ..model import default_model, to_transformers

    layers = FULL_LAYERS if num_layers is None else num_layers
    say(f"building LFM2.5-8B-A1B-shaped model: {layers} layers, vocab {vocab_size}, bf16, random weights ...")
    t0 = time.perf_counter()
    ours = default_model(num_layers=layers, dtype=torch.bfloat16, seed=seed, vocab_size=vocab_size, progress=False)
    model = to_transformers(ours, attn_implementation="sdpa", experts_implementation="grouped_mm")
    n_params = sum(p.numel() for p in model.parameters())
    say(f"  built {n_params / 1e9:.2f}B parameters in {time.perf_counter() - t0:.1f}s")
    token_bytes = ours.bytes_per_decoded_token(1)
    token_params = token_bytes // ours.dtype.itemsize  # every weight a token reads is bf16 (but a few fp32 biases)
    if bandwidth is None:
        from .core import measure_read_bandwidth

        bandwidth = measure_read_bandwidth(nbytes=1 << 29)
    floor_tok_s = bandwidth / token_bytes
    say(f"  a decoded token reads {token_bytes / 1e9:.2f} GB of weights; read bandwidth {bandwidth / 1e9:.1f} GB/s "
        f"-> floor {floor_tok_s:.2f} tok/s")

    from lfm_kernels.integrations import transformers as integration

    if integration.is_patched():
        raise RuntimeError("run_patch_bench needs an unpatched transformers: call lfm_kernels.unpatch() first")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=gen)
    runs: dict[str, list[dict]] = {"transformers": [], "patched": []}
    ratios: dict[str, list[float]] = {"prefill": [], "decode": []}

    def set_variant(variant: str) -> None:
        if variant == "patched":
            lfm_kernels.patch(model)
        else:
            lfm_kernels.unpatch()

    try:
        say(f"unpatched transformers ({model.config._attn_implementation} attention, "
            f"{model.config._experts_implementation} experts) vs lfm_kernels.patch(model), interleaved: "
            f"{rounds} rounds of prefill {prompt_len} + decode {new_tokens} ...")
        for variant in ("transformers", "patched"):  # warm-up: first-call allocations, lazy imports
            set_variant(variant)
            with torch.inference_mode():
                _prefill(model, ids[:, :8])
        for r in range(rounds):
            # ABBA order, so a drift in the machine's speed during a round hits both variants alike
            order = ("transformers", "patched") if r % 2 == 0 else ("patched", "transformers")
            this = {}
            for variant in order:
                set_variant(variant)
                this[variant] = _measure_once(model, ids, new_tokens)
                runs[variant].append(this[variant])
            for phase in ratios:
                key = f"{phase}_s"
                ratios[phase].append(this["transformers"][key] / this["patched"][key])
            say(f"  round {r + 1}: " + ", ".join(
                f"{v} prefill {this[v]['prefill_s'] * 1e3:.0f} ms, decode {this[v]['decode_s'] / new_tokens * 1e3:.0f} ms/token"
                for v in ("transformers", "patched")))
        results = {v: _summary(runs[v], prompt_len, new_tokens) for v in runs}
    finally:
        lfm_kernels.unpatch()
        del model
        gc.collect()

    base, fast = results["transformers"], results["patched"]
    same = sum(a == b for a, b in zip(base["tokens"], fast["tokens"]))
    common = {
        "layers": layers,
        "vocab": vocab_size,
        "dtype": "bf16",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "backend": _backend.cpu_isa(),
        "params_b": round(n_params / 1e9, 3),
        "bandwidth_gb_s": round(bandwidth / 1e9, 2),
    }
    rows = []
    for phase, key, n in (("prefill", "prefill_tok_s", prompt_len), ("decode", "decode_tok_s", new_tokens)):
        for variant, res in (("transformers", base), ("patched", fast)):
            rows.append(
                {
                    **common,
                    "phase": phase,
                    "tokens": n,
                    "variant": variant,
                    "tok_s": res[key],
                    "ms_per_token": 1e3 / res[key],
                    "speedup": res[key] / base[key],
                    # patched over unpatched within each round: how much the ratio moved with the machine
                    "round_speedups": "" if variant == "transformers" else
                    " ".join(f"{x:.2f}" for x in ratios[phase]),
                    "greedy_tokens_matching": f"{same}/{len(base['tokens'])}",
                }
            )
            if phase == "decode":
                rows[-1]["gb_read_per_token"] = round(token_bytes / 1e9, 3)
                rows[-1]["floor_tok_s"] = floor_tok_s
                rows[-1]["share_of_floor"] = res[key] / floor_tok_s
            else:
                rows[-1]["gflop_s"] = 2 * token_params * res[key] / 1e9
    for row in rows:
        extra = (f"{100 * row['share_of_floor']:.0f}% of floor {row['floor_tok_s']:.2f} tok/s"
                 if row["phase"] == "decode" else f"{row['gflop_s']:.1f} GFLOP/s")
        say(f"  {row['phase']:7s} {row['variant']:12s} {row['tok_s']:8.2f} tok/s  x{row['speedup']:.2f}  {extra}")
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="default: all 24 (about 17 GB of bf16 weights)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    run_patch_bench(args.layers, args.prompt_len, args.new_tokens)
