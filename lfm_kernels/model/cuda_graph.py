"""CUDA-graph decoding for the model wrapper: the decode step is captured once and replayed per token.

A decode step of LFM2.5-8B-A1B issues a few hundred small launches (24 layers of norms, linears,
the conv or attention, the router and the experts' kernels); at batch 1 the GPU finishes most of
them faster than the host can issue the next, so the step is bound by launch overhead. A CUDA graph
replays all of them with one launch. Capture needs every op on the path to run without a host sync
and with fixed shapes: the batch and the state's length are fixed by the state, the Triton kernels
never read anything back (the MoE block layout is built on the device, decode attention's length
check is off because the lengths come from the state itself), and the state-is-full check moves to
the host here, where the step count is known without asking the device.

    runner = DecodeGraph(model, state)     # after prefill filled `state`
    logits = runner(tokens)                # [B] int64 -> [B, V]; the first call captures

The logits tensor is reused by the next call: consume it (sample) before calling again.
"""

from __future__ import annotations

from typing import Callable

import torch

from .model import LfmModel, State


def _snapshot(model: LfmModel, state: State) -> dict:
    """What one decode step changes: the conv states, seq_lens, and each KV cache at the positions
    seq_lens points to (the step writes the new token's key and value there)."""
    pos = state.seq_lens.clamp(max=state.max_len - 1)
    rows = torch.arange(state.batch, device=pos.device)
    return {
        "conv": {i: s.clone() for i, s in state.conv_state.items()},
        "seq_lens": state.seq_lens.clone(),
        "k": {i: k[rows, :, pos].clone() for i, k in state.k_cache.items()},
        "v": {i: v[rows, :, pos].clone() for i, v in state.v_cache.items()},
    }


def _restore(state: State, saved: dict) -> None:
    state.seq_lens.copy_(saved["seq_lens"])
    pos = state.seq_lens.clamp(max=state.max_len - 1)
    rows = torch.arange(state.batch, device=pos.device)
    for i, s in saved["conv"].items():
        state.conv_state[i].copy_(s)
    for i, k in saved["k"].items():
        state.k_cache[i][rows, :, pos] = k
    for i, v in saved["v"].items():
        state.v_cache[i][rows, :, pos] = v


def _buffer_ids(state: State) -> tuple:
    """What a captured graph reads by address besides the weights: the state's buffers (and its
    length, which sizes the RoPE tables)."""
    return (state.max_len, *(t.data_ptr() for t in state.buffers()))


class DecodeGraph:
    """model.decode_step(tokens, state) captured as one CUDA graph for this state (batch, max_len)."""

    def __init__(self, model: LfmModel, state: State):
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, got {model.device}")
        if state.seq_lens.device != model.device:
            raise ValueError(f"the state is on {state.seq_lens.device} but the model on {model.device}")
        self.model, self.state = model, state
        self._next_pos: int | None = None  # the longest row's next position, counted on the host
        self.tokens = torch.zeros(state.batch, dtype=torch.int64, device=model.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._buffers: tuple = ()
        self.logits: torch.Tensor | None = None

    def _capture(self) -> None:
        model, state, dev = self.model, self.state, self.model.device
        # One eager step first, on a side stream as capture requires: it compiles every Triton
        # kernel and creates cuBLAS's handles, none of which may happen during capture. It changes
        # the state, so what it changes is put back afterwards.
        saved = _snapshot(model, state)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            model.decode_step(self.tokens, state, check=False)
        torch.cuda.current_stream(dev).wait_stream(side)
        _restore(state, saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = model.decode_step(self.tokens, state, check=False)
        # the graph reads these by address: keep them alive even if a longer state regrows the tables
        self._rope = model._rope_tables(state.max_len)
        self.graph = graph

    path = "cuda graph"  # how the steps run (for the bench)

    def reset(self) -> None:
        """For a state that was zeroed and prefilled again (generate() reuses its last state): the
        host's position count starts over; the captured graph stays valid (same buffers)."""
        self._next_pos = None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._next_pos is None:
            # one read of the lengths, at the first step, so the per-step check needs no sync
            self._next_pos = int(self.state.seq_lens.max())
        if self._next_pos >= self.state.max_len:
            raise ValueError(f"the state is full (max_len {self.state.max_len}); make a longer one")
        if tuple(tokens.shape) != (self.state.batch,):
            raise ValueError(f"tokens must have shape [B={self.state.batch}], got {tuple(tokens.shape)}")
        self.tokens.copy_(tokens)
        if self.graph is not None and self._buffers != _buffer_ids(self.state):
            self.graph = None  # generate() grew the state: new caches and RoPE tables, capture again
        if self.graph is None:
            self._capture()
            self._buffers = _buffer_ids(self.state)
        self.graph.replay()
        self._next_pos += 1
        return self.logits


def decode_stepper(model: LfmModel, state: State, cuda_graph: bool = True,
                   cpu_graph: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """tokens [B] -> logits [B, V], one decode step on `state`, for a loop that sized the state itself
    (so the per-step "state is full" check, a device sync, is skipped). On CUDA with cuda_graph=True
    the step is captured at its first call and replayed after; on the CPU with cpu_graph=True its op
    calls are recorded at the first two and replayed from C++ after (cpu_graph.py). Same bits."""
    if cuda_graph and model.device.type == "cuda":
        return DecodeGraph(model, state)
    if cpu_graph:
        from .cpu_graph import CpuDecodeGraph, cpu_graph_available

        if cpu_graph_available(model):
            return CpuDecodeGraph(model, state)
    return lambda tokens: model.decode_step(tokens, state, check=False)
