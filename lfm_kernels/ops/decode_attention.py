"""GQA decode attention (placeholder: runs the reference until the kernels land)."""

from __future__ import annotations

from .. import reference


def decode_attention(q, k_cache, v_cache, seq_lens, scale):
    return reference.decode_attention(q, k_cache, v_cache, seq_lens, scale)
