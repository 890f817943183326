"""CPU-graph decoding for the model wrapper: the decode step's op calls are recorded (twice) and then
replayed from C++ per token (csrc/op_replay.cpp), the CPU counterpart of cuda_graph.py.

A decode step of the full-size model makes about 390 dispatcher calls (the C++ ops and the views
between them). From Python each costs the interpreter, argument parsing and a boxed dispatch, on
caches the weight streams have just evicted: 2-3 ms of a 45 ms Q4_0 token. Replayed, each call is
one boxed dispatch of a prepared argument stack. The replay runs the same ops with the same
arguments, so its logits are the eager step's bits.

What makes a recorded step replayable, and how each rule is enforced:
- Every call is a C++ kernel of `aten` or `lfm_kernels_cpu` (no Python kernels, no other libraries).
- Nothing in the step reads a tensor's value into Python. The embedding lookup is recorded too
  (aten::embedding, or the quantized table's C++ lookup `quant_embedding`). A call that returns
  anything but tensors (`item`, say) refuses the graph.
- Nothing else changes between steps but tensor contents: the step is recorded twice, and the two
  recordings must make the same calls with the same constant tensors (the very same objects: the
  weights, the state's buffers, the RoPE tables) and the same non-tensor arguments. A tensor created
  in Python during the step, or a Python number that moves with the position, shows up as a
  difference and refuses the graph.
- The routes the step took (the kernel policy) are those of its recording: a change of the policy's
  route token drops the graph, and the next two steps record it again.
A refused graph leaves the stepper eager (`reason` says why); it never returns other bits.

    step = CpuDecodeGraph(model, state)   # after prefill filled `state`
    logits = step(tokens)                 # [B] int64 -> [B, V]; the first two calls record
"""

from __future__ import annotations

import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import _backend, _policy
from .model import LfmModel, State

_NAMESPACES = ("aten", "lfm_kernels_cpu")
_MAX_MISMATCHES = 3


class _Recorder(TorchDispatchMode):
    """Runs every call as usual and keeps (op, args, kwargs, out) in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


class _Refused(Exception):
    pass


def _positional(func, args, kwargs) -> list:
    """Every schema argument of the call in order, defaults filled in."""
    full = []
    for i, a in enumerate(func._schema.arguments):
        if i < len(args):
            full.append(args[i])
        elif a.name in kwargs:
            full.append(kwargs[a.name])
        elif a.has_default_value():
            full.append(a.default_value)
        else:  # pragma: no cover - the call itself would have failed
            raise _Refused(f"{func} was called without its argument {a.name}")
    return full


def _program(calls, inputs, result):
    """The recording as [(func, args, {arg index: register}, out registers)], the register count and
    the result's register: register r < len(inputs) is input r, the others are op outputs; every other
    tensor argument is a constant."""
    regs = {id(t): r for r, t in enumerate(inputs)}
    prog = []
    for func, args, kwargs, out in calls:
        name = func._schema.name
        if name.split("::")[0] not in _NAMESPACES:
            raise _Refused(f"{name} is not a C++ op of aten or lfm_kernels_cpu")
        rets = func._schema.returns
        if not all(isinstance(r.type, torch.TensorType) for r in rets):
            raise _Refused(f"{name} returns a non-tensor: the step reads a value into Python")
        full = _positional(func, args, kwargs)
        from_reg = {}  # (argument, list element or -1) -> register; those places hold None in `full`
        for i, a in enumerate(full):
            if isinstance(a, torch.Tensor) and id(a) in regs:
                from_reg[(i, -1)] = regs[id(a)]
                full[i] = None
            elif isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and id(t) in regs for t in a):
                a = list(a)
                for e, t in enumerate(a):
                    if isinstance(t, torch.Tensor) and id(t) in regs:
                        from_reg[(i, e)] = regs[id(t)]
                        a[e] = None
                full[i] = a
        outs = [] if not rets else list(out) if len(rets) > 1 else [out]
        out_regs = []
        for t in outs:
            if id(t) in regs or any(t is a for a in full if isinstance(a, torch.Tensor)):
                out_regs.append(-1)  # in place: the argument itself comes back
            else:
                regs[id(t)] = len(regs)
                out_regs.append(regs[id(t)])
        prog.append((func, full, from_reg, out_regs))
    if id(result) not in regs:
        raise _Refused("the step's result is not an op's output")
    return prog, len(regs), regs[id(result)]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _compare(p1, p2) -> None:
    """Refuses unless the two recordings made the same calls with the same constants."""
    if len(p1) != len(p2):
        raise _Refused(f"the two recorded steps made {len(p1)} and {len(p2)} calls")
    for k, ((f1, a1, r1, o1), (f2, a2, r2, o2)) in enumerate(zip(p1, p2)):
        if f1 is not f2 or r1 != r2 or o1 != o2:
            raise _Refused(f"call {k} differs between the two recorded steps ({f1} / {f2})")
        for i, (x, y) in enumerate(zip(a1, a2)):
            if not _same(x, y):
                raise _Refused(f"argument {f1._schema.arguments[i].name} of call {k} ({f1}) differs between the "
                               "two recorded steps")


def _build(prog, nregs):
    replay = _backend._C.OpReplay(nregs)
    placeholder = torch.empty(0)
    for func, full, from_reg, out_regs in prog:
        name, overload = func._schema.name, func._schema.overload_name
        args = list(full)
        for i, e in from_reg:
            if e >= 0:  # the list keeps its length: a placeholder where the register's tensor goes
                args[i] = [placeholder if k == e else t for k, t in enumerate(args[i])]
        try:
            replay.add(name, overload, args, [(i, e, r) for (i, e), r in sorted(from_reg.items())], out_regs)
        except (ValueError, TypeError, RuntimeError) as e:  # an argument the C++ side cannot take: stay eager
            raise _Refused(f"the replay could not take the recording: {e}") from e
    return replay


def cpu_graph_available(model: LfmModel) -> bool:
    """Whether a CPU graph can run for this model: on the CPU, with a compiled extension that has it."""
    return (model.device.type == "cpu" and _backend.cpu_extension_available()
            and hasattr(_backend._C, "OpReplay"))


def _x8_formats(model: LfmModel) -> tuple[str, ...]:
    """The formats of the model's quantized weights in the x8 layout (those the stream setting reads)."""
    from ..quant import QuantizedTensor
    from .weights import SplitWeight

    out = set()
    for _, t in model.weights.tensors():
        for p in (t.parts if isinstance(t, SplitWeight) else (t,)):
            if isinstance(p, QuantizedTensor) and p.layout == "x8":
                out.add(p.format)
    return tuple(sorted(out))


class CpuDecodeGraph:
    """model.decode_step(tokens, state, check=False) for this state, replayed from a recording of its
    op calls after the first two steps (see the module's docstring)."""

    def __init__(self, model: LfmModel, state: State):
        if not cpu_graph_available(model):
            raise ValueError(f"a CPU graph needs the model on the CPU and the compiled extension (model on "
                             f"{model.device}, extension {'loaded' if _backend.cpu_extension_available() else 'missing'})")
        if state.seq_lens.device != model.device:
            raise ValueError(f"the state is on {state.seq_lens.device} but the model on {model.device}")
        self.model, self.state = model, state
        self.replay = None
        self.reason: str | None = None  # why the graph was refused (the stepper then stays eager)
        self._first = None  # the first of the two recordings
        self._route = None
        self._buffers: tuple = ()
        self._max_len = -1
        self._result = -1
        self._mismatches = 0
        self._x8_formats: tuple[str, ...] | None = None

    def _stream_trial(self):
        """The kernel chooser's x8 stream trial while one is on for this model's formats: the replayed
        steps are what it times (lfm_kernels/_chooser.py, DecodeStreamTrial)."""
        if self._x8_formats is None:
            self._x8_formats = _x8_formats(self.model)
        return _policy.decode_stream_trial(self._x8_formats, self.state.batch)

    @property
    def path(self) -> str:
        """How the steps run now: replayed, still recording, or eager and why (for the bench)."""
        if self.replay is not None:
            return f"cpu graph ({len(self.replay)} calls replayed)"
        if self.reason is not None:
            return f"eager (cpu graph refused: {self.reason})"
        return "eager (cpu graph not recorded yet)"

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        model, state = self.model, self.state
        if tuple(tokens.shape) != (state.batch,):
            raise ValueError(f"tokens must have shape [B={state.batch}], got {tuple(tokens.shape)}")
        # the step from the token ids on: the embedding lookup is a C++ op too
        step = lambda t: model._decode_embedded(model._embed(t).unsqueeze(1), state)  # noqa: E731
        if self.reason is not None:
            return step(tokens)
        # generate() grows a state by replacing its caches (and, with its longer max_len, the RoPE tables)
        route, buffers = _policy.route_token(), state.buffers()
        same = (self._route is not None and _policy.same_route_token(route, self._route)
                and state.max_len == self._max_len
                and len(buffers) == len(self._buffers) and all(a is b for a, b in zip(buffers, self._buffers)))
        if self.replay is not None and same:
            trial = self._stream_trial()
            if trial is None:
                return self.replay.run([tokens], [self._result])[0]
            setting = trial.setting()
            _backend._C.set_x8_one_stream_max_rows(setting)
            t0 = time.perf_counter()
            out = self.replay.run([tokens], [self._result])[0]
            trial.record(setting, time.perf_counter() - t0)
            return out
        if not same:  # the policy changed, or the state grew (new caches, longer RoPE tables): record again
            self.replay, self._first = None, None
        self._route, self._buffers, self._max_len = route, buffers, state.max_len
        rec = _Recorder()
        with rec:
            out = step(tokens)
        try:
            prog = _program(rec.calls, [tokens], out)
        except _Refused as e:
            self.reason, self._first = str(e), None
            return out
        if self._first is None:
            self._first = prog
            return out
        try:
            _compare(self._first[0], prog[0])
        except _Refused as e:
            # a step that measured the kernel choice (the chooser's first call of a shape) makes extra
            # calls: record again, and give up only if the steps keep differing
            self._mismatches += 1
            if self._mismatches >= _MAX_MISMATCHES:
                self.reason, self._first = str(e), None
            else:
                self._first = prog
            return out
        _, nregs, result = prog
        self._first = None
        try:
            self.replay, self._result = _build(prog[0], nregs), result
        except _Refused as e:
            self.reason = str(e)
        return out
