"""Matmuls on quantized blocks with llama.cpp's own CPU kernels (ggml, through `ggml-python`).

A decode on a CPU is bound by the bytes of weights it touches: computing on a GGUF's 4.5-bit blocks touches
7x fewer bytes than float32. ggml's `mul_mat` takes the blocks as they lie in the file (Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) and float32 activations, which it rounds to 8-bit blocks itself (as llama.cpp
does: results differ from dequantize + `F.linear` by that rounding, ~0.5-0.7 % relative). Our own int4 store
is GGUF Q4_1 split into parts, and a GGUF's Q8_0 kept as int8 parts is Q8_0: both are interleaved back into
those block layouts once (`to_ggml`).

Why ggml and not torch's `_weight_int4pack_mm_for_cpu`: one library covers every block type llama.cpp files
use (torch's kernel takes 16-level blocks only, no Q5/Q6/Q8, and its float32 path runs 30x slower than its
bfloat16 one); measured side by side in bench/gguf_kernels.py and docs/quantization.md. `ggml-python`
(pinned in install.sh) builds ggml from its sdist with -march=native in about 35 s on 2 cores.

ggml is driven through its C API with ctypes: one tiny graph (weight, activations, mul_mat) per shape and
batch size, cached, whose tensors' data pointers are set to our torch buffers at each call (no copies), and
computed on one ggml threadpool sized to the model's compute threads (`threads`).
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections import OrderedDict
from contextlib import contextmanager

import torch
from torch import nn

from .gguf import GGML

# ggml's type ids (ggml.h, enum ggml_type) of the block types we keep
GGML_TYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q4_k": 12, "q5_k": 13, "q6_k": 14}
_F32 = 0
# how install.sh builds ggml-python: for this CPU, ggml's own threads (no OpenMP runtime beside torch's), and
# llamafile's tiled matmuls (llama.cpp's default)
CMAKE_ARGS = "-DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DGGML_LLAMAFILE=ON"
# ggml's threads poll this long for the next call before they sleep (ggml's default). Torch then runs on one
# thread beside them (`threads`): with torch's own second thread spinning too, a decode step of the embedded
# model took 222 ms instead of 23; with ggml's threads sleeping at once, 50 ms (each of 211 calls waking one).
_POLL = 50

_state: dict = {}
_lock = threading.Lock()
# a call of this many rows or more repacks blocks bound as stored (a streamed unit's) for it: repacking a
# 8960 x 1536 Q4_K weight took 10 ms here, and saved 2.6 ms of its matmul at 16 rows, 11 ms at 64, 36 ms at 256
REPACK_ROWS = 64


def available() -> bool:
    """Whether ggml's kernels can be loaded (ggml-python installed and its library loads)."""
    if "lib" not in _state:
        try:
            import ggml  # ggml-python: ctypes bindings over libggml, built by ./install.sh
            _state["lib"] = ggml
        except (ImportError, OSError) as e:   # not installed, or its library does not load on this CPU
            _state["lib"] = None
            _state["why"] = f"{type(e).__name__}: {e}"
        else:
            _quiet_logs(ggml)
    return _state["lib"] is not None


def _quiet_logs(g) -> None:
    """ggml's warnings and errors to stderr, not its debug and info lines (it writes one for every weight it
    repacks). The callback is kept here: ggml holds only its address."""
    def log(level, text, _user):
        if level in (g.GGML_LOG_LEVEL_WARN, g.GGML_LOG_LEVEL_ERROR) and text:
            sys.stderr.write(text.decode(errors="replace"))

    try:
        _state["log"] = g.ggml_log_callback(log)
        g.ggml_log_set(_state["log"], None)
    except (AttributeError, TypeError):   # an older ggml-python: its own logging stays
        pass


def unavailable_reason() -> str:
    available()
    return _state.get("why", "")


def kernel_kind(kind: str, shapes: dict[str, tuple] | None = None) -> str | None:
    """The GGUF block type a stored weight computes as: its own kind for a GGUF's blocks, Q4_1 for our int4
    blocks of 32, Q8_0 for symmetric int8 blocks of 32 (a GGUF's Q8_0 kept as parts); None where ggml has no
    kernel for it (our asymmetric int8 blocks of 64). shapes: {suffix: shape} of the stored parts."""
    if kind in GGML_TYPES:
        return kind
    if shapes is None or ".scale" not in shapes:
        return None
    if kind == "int4" and ".q4" in shapes and shapes[".q4"][1] * 2 // shapes[".scale"][1] == 32:
        return "q4_1"
    if kind == "int8" and ".q8" in shapes and ".min" not in shapes and shapes[".q8"][1] // shapes[".scale"][1] == 32:
        return "q8_0"
    return None


def to_ggml(kind: str, parts: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> tuple[str, torch.Tensor]:
    """(GGUF kind, uint8 [rows, bytes per row]) from a stored weight's parts: a GGUF's blocks as they are (no
    copy); our int4 (Q4_1 split into codes, scale, min) and int8 (Q8_0 split) parts interleaved back into
    blocks, into `out` when given."""
    gk = kernel_kind(kind, {sf: tuple(t.shape) for sf, t in parts.items()})
    if gk is None:
        raise ValueError(f"no ggml kernel for {kind}")
    if kind in GGML_TYPES:
        return gk, parts["." + kind]
    kind = "int4" if ".q4" in parts else "int8"
    codes = parts[".q4"] if kind == "int4" else parts[".q8"].view(torch.uint8)
    rows = codes.shape[0]
    nb = parts[".scale"].shape[1]
    fields = [parts[".scale"].to(torch.float16).contiguous().view(torch.uint8).reshape(rows, nb, 2)]
    if kind == "int4":
        fields.append(parts[".min"].to(torch.float16).contiguous().view(torch.uint8).reshape(rows, nb, 2))
    fields.append(codes.reshape(rows, nb, -1))
    width = sum(f.shape[-1] for f in fields)
    if out is None:
        out = torch.empty((rows, nb * width), dtype=torch.uint8)
    dst = out.view(rows, nb, width)
    at = 0
    for f in fields:
        dst[..., at:at + f.shape[-1]].copy_(f)
        at += f.shape[-1]
    return gk, out


def ggml_bytes(kind: str, parts_shapes: dict[str, tuple]) -> int:
    """Bytes of `to_ggml`'s output for our int4 / int8 parts (0 for a GGUF's blocks: used as they lie)."""
    if kind in GGML_TYPES:
        return 0
    rows, nb = parts_shapes[".scale"]
    per = 20 if kind == "int4" else 34
    return rows * nb * per


class _Graph:
    """One cached ggml graph y = mul_mat(w, x) for a weight type and shape, a batch size and a thread count
    (`w`: a repacked weight's own tensor, else one whose data pointer is set at each call)."""

    def __init__(self, g, gtype: int, k: int, n: int, m: int, threads: int, pool, w=None):
        params = g.ggml_init_params(mem_size=3 * g.ggml_tensor_overhead() + g.ggml_graph_overhead_custom(4, False),
                                    mem_buffer=None, no_alloc=True)
        self.ctx = g.ggml_init(params)
        w = g.ggml_new_tensor_2d(self.ctx, gtype, k, n) if w is None else w
        x = g.ggml_new_tensor_2d(self.ctx, _F32, k, m)
        y = g.ggml_mul_mat(self.ctx, w, x)
        self.graph = g.ggml_new_graph_custom(self.ctx, 4, False)
        g.ggml_build_forward_expand(self.graph, y)
        self.w, self.x, self.y = w.contents, x.contents, y.contents
        self.plan = g.ggml_graph_plan(self.graph, threads, pool)
        self.work = torch.empty(max(1, self.plan.work_size), dtype=torch.uint8)
        self.plan.work_data = ctypes.cast(self.work.data_ptr(), ctypes.POINTER(ctypes.c_uint8))
        self.plan_ref = ctypes.byref(self.plan)
        self.compute = g.lib.ggml_graph_compute   # (looked up once: ggml-python's module lookup costs ~1 us)
        self._free = g.ggml_free

    def __del__(self):
        try:
            self._free(self.ctx)
        except Exception:   # interpreter teardown
            pass


_graphs: OrderedDict = OrderedDict()
MAX_GRAPHS = 256


def _pool(g, threads: int, poll: int):
    if _state.get("pool_key") != (threads, poll):
        if _state.get("pool"):
            _graphs.clear()
            g.ggml_threadpool_free(_state["pool"])
        p = g.ggml_threadpool_params_default(threads)
        p.poll = poll
        _state["pool"], _state["pool_key"] = g.ggml_threadpool_new(ctypes.byref(p)), (threads, poll)
        _state["pool_gen"] = _state.get("pool_gen", 0) + 1   # (repacked weights' graphs name the pool they use)
    return _state["pool"]


def _repack_buffer_type(g):
    """ggml's CPU_REPACK buffer type (llama.cpp's "CPU_REPACK", on there by default), or None where this build of
    ggml has none. A weight allocated in it is interleaved as it is set, 4 or 8 rows at a time, for ggml's GEMV
    and GEMM kernels of its type on this CPU (AVX2 / AVX-512: Q4_0 and Q4_K here); others get no repacking."""
    if "repack" not in _state:
        found = None
        try:
            reg = g.ggml_backend_cpu_reg()
            addr = g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
            if addr:
                get = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(addr)
                arr = get(g.ggml_backend_reg_dev_get(reg, 0))
                i = 0
                while arr and arr[i]:
                    if g.ggml_backend_buft_name(arr[i]) == b"CPU_REPACK":
                        found = arr[i]
                    i += 1
        except (AttributeError, OSError, ValueError):   # an older ggml-python: no backend registry
            found = None
        _state["repack"] = found
    return _state["repack"]


class Repacked:
    """A weight's blocks copied into ggml's repack buffer (`_repack_buffer_type`): the same bytes as the
    blocks, in RAM of its own, so the blocks it came from can be freed. Its results agree with the blocks'
    to float rounding (ggml's repacked kernels sum in another order: ~1e-7 relative), not bit for bit, and
    a row's result depends on whether its call has 4 rows or more (GEMM) or fewer (GEMV)."""

    def __init__(self, g, buft, kind: str, blocks: torch.Tensor):
        per, size = GGML[kind]
        self.kind, self.shape = kind, tuple(blocks.shape)
        self.k = blocks.shape[1] // size * per
        params = g.ggml_init_params(mem_size=g.ggml_tensor_overhead(), mem_buffer=None, no_alloc=True)
        self._g, self.ctx, self.buf = g, g.ggml_init(params), None
        self.t = g.ggml_new_tensor_2d(self.ctx, GGML_TYPES[kind], self.k, blocks.shape[0])
        self.buf = g.ggml_backend_alloc_ctx_tensors_from_buft(self.ctx, buft)
        if not self.buf:
            raise MemoryError(f"ggml could not allocate {blocks.numel()} bytes for a repacked {kind} weight")
        # ggml names a repacking for the tensor as it is allocated, where its type and shape have one
        self.ok = bool(self.t.contents.extra)
        if self.ok:
            g.ggml_backend_tensor_set(self.t, ctypes.c_void_p(blocks.data_ptr()), 0, blocks.numel())
        self.graphs: OrderedDict = OrderedDict()

    def close(self):
        self.graphs.clear()
        if self.buf:
            self._g.ggml_backend_buffer_free(self.buf)
            self.buf = None
        if self.ctx:
            self._g.ggml_free(self.ctx)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:   # interpreter teardown
            pass


def repack(kind: str, blocks: torch.Tensor) -> Repacked | None:
    """`blocks` (uint8 [rows, bytes per row] of GGUF `kind`) repacked for ggml's faster kernels of their type on
    this CPU, or None where ggml has no repacking for that type, shape or CPU (the blocks are then used as
    they are)."""
    if not available() or blocks.device.type != "cpu":
        return None
    g = _state["lib"]
    buft = _repack_buffer_type(g)
    if buft is None:
        return None
    with _lock:
        r = Repacked(g, buft, kind, blocks.contiguous())
    if not r.ok:
        r.close()
        return None
    return r


def repackable(kind: str) -> bool:
    """Whether ggml repacks weights of GGUF `kind` on this CPU (`repack`), tried once on a small weight: what
    `layerstream plan` says will be repacked, before any weight is read."""
    known = _state.setdefault("repackable", {})
    if kind not in known:
        r = None
        if kind in GGML_TYPES:
            per, size = GGML[kind]
            r = repack(kind, torch.zeros((8, 256 // per * size), dtype=torch.uint8))
        known[kind] = r is not None
        if r is not None:
            r.close()
    return known[kind]


@contextmanager
def threads(n: int, torch_threads: int = 1):
    """ggml computes on `n` threads inside this block. torch keeps `torch_threads` (one by default: their two
    thread pools would spin against each other); where torch needs more (a MoE model's experts, dequantized and
    computed by torch), ggml's threads sleep between calls instead of polling."""
    before = _state.get("threads_wanted"), _state.get("poll"), torch.get_num_threads()
    _state["threads_wanted"], _state["poll"] = n, (_POLL if torch_threads == 1 else 0)
    if before[2] != torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        yield
    finally:
        _state["threads_wanted"], _state["poll"] = before[0], before[1]
        if before[2] != torch_threads:
            torch.set_num_threads(before[2])


def mul_mat(kind: str, w: torch.Tensor | Repacked, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [m, n] float32 = x [m, k] float32 @ dequant(w).T, w uint8 [n, bytes per row] of GGUF `kind` blocks
    (or those blocks `repack`ed), all contiguous on the CPU, computed by ggml on the threads `threads` set (else
    torch's count)."""
    if not available():
        raise RuntimeError(f"ggml's kernels are not available ({unavailable_reason()})")
    return _compute(kind, w, x.shape[1], x.shape[0], x.data_ptr(), out)


def _compute(kind: str, w, k: int, m: int, xptr: int, out: torch.Tensor) -> torch.Tensor:
    """`mul_mat` on raw pointers: the path every BlockLinear call takes (a decode step of the embedded model
    makes 211 of them, and each microsecond here is 0.2 ms a token), kernels known to be available."""
    g = _state["lib"]
    threads = _state.get("threads_wanted") or torch.get_num_threads()
    poll = _state.get("poll")
    if poll is None:
        poll = _POLL
    repacked = type(w) is Repacked
    with _lock:
        if _state.get("pool_key") != (threads, poll):
            _pool(g, threads, poll)
        if repacked:
            # a repacked weight keeps graphs over its own tensor (a few: decode's batch sizes; a prefill's
            # length is seldom seen twice)
            cache, limit, key = w.graphs, 4, (m, threads, poll, _state["pool_gen"])
        else:   # blocks as stored share graphs by shape, their data pointer set at each call
            cache, limit, key = _graphs, MAX_GRAPHS, (kind, k, w.shape[0], m, threads, poll)
        gr = cache.get(key)
        if gr is None:
            gr = cache[key] = _Graph(g, GGML_TYPES[kind], k, w.shape[0], m, threads, _state["pool"],
                                     w=w.t if repacked else None)
            if len(cache) > limit:
                cache.popitem(last=False)
        elif len(cache) > 1:
            cache.move_to_end(key)
        if not repacked:
            gr.w.data = w.data_ptr()
        gr.x.data, gr.y.data = xptr, out.data_ptr()
        status = gr.compute(gr.graph, gr.plan_ref)
    if status != 0:
        raise RuntimeError(f"ggml_graph_compute failed with status {status}")
    return out


class BlockLinear(nn.Module):
    """y = x @ dequant(W).T + b with W kept as GGUF blocks (uint8 [out, bytes per row]) and computed on by ggml.

    Swapped in for an `nn.Linear` of the skeleton. A resident unit binds its blocks once; a streamed one
    binds them at each forward, as the loader brings them (`bind` / `unbind`). Every batch size runs on ggml,
    never on a dequantized copy: on blocks as stored a row's result is then the same bits whatever else shares
    its sweep (the engine's greedy requests give `generate`'s tokens; `Repacked` blocks trade that for speed),
    and no call pays for dequantizing the weight (a
    prefill of the embedded model's 38-token prompt ran at 246 tok/s on ggml, 90 when each call dequantized
    its weight for torch's dense matmul)."""

    def __init__(self, in_features: int, out_features: int, kind: str, bias: nn.Parameter | None = None):
        super().__init__()
        per, size = GGML[kind]
        if in_features % per:
            raise ValueError(f"{in_features} input features are not whole {kind} blocks of {per}")
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.row_bytes = in_features // per * size
        self.blocks: torch.Tensor | None = None
        self.perm: torch.Tensor | None = None
        self.bias = bias
        # blocks bound as stored (streamed) are repacked for a call of this many rows or more (None: never)
        self.repack_rows: int | None = None

    @classmethod
    def replacing(cls, linear: nn.Linear, kind: str) -> "BlockLinear":
        return cls(linear.in_features, linear.out_features, kind, linear.bias)

    def bind(self, blocks: torch.Tensor | Repacked, perm: torch.Tensor | None = None) -> None:
        """Compute on `blocks` (or on them `repack`ed); with `perm`, blocks whose rows are in another order than
        the weight's (a GGUF's q/k rows as llama.cpp's converter interleaves them, mapped in place): output k is
        then the blocks' row perm[k], gathered from the outputs (a few floats a token) instead of copying the
        rows into order."""
        repacked = isinstance(blocks, Repacked)
        if (not repacked and blocks.dtype != torch.uint8) or tuple(blocks.shape) != (self.out_features,
                                                                                       self.row_bytes) \
                or (repacked and blocks.kind != self.kind):
            raise ValueError(f"{self.kind} blocks of shape {tuple(blocks.shape)} "
                             f"({blocks.kind if repacked else blocks.dtype}) do not make a "
                             f"{self.out_features} x {self.in_features} weight")
        # plain attribute writes (nn.Module's __setattr__ costs ~6 us: 2.5 ms a token of a streamed 135M model)
        object.__setattr__(self, "blocks", blocks if repacked or blocks.is_contiguous() else blocks.contiguous())
        object.__setattr__(self, "perm", perm)

    def unbind(self) -> None:
        object.__setattr__(self, "blocks", None)
        object.__setattr__(self, "perm", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the common call (float32 and contiguous activations, rows in order, no repacking for it) goes straight
        # to ggml with no reshape or view: a decode step of the embedded model makes 211 of these calls, and
        # each tensor call here costs ~1-2 us
        w = self.blocks
        if w is None:
            raise RuntimeError("BlockLinear called with no blocks bound")
        shape = x.shape
        if not shape or shape[-1] != self.in_features:
            raise ValueError(f"input of shape {tuple(shape)} for a linear layer of {self.in_features} features")
        rows = x.numel() // self.in_features
        # blocks as stored (a streamed unit's) repacked for this call: a long one
        repack_now = self.repack_rows is not None and rows >= self.repack_rows and type(w) is not Repacked
        if rows and x.dtype is torch.float32 and self.perm is None and x.is_contiguous() and _state.get("lib") \
                and not repack_now:
            y = torch.empty(shape[:-1] + (self.out_features,), dtype=torch.float32)
            _compute(self.kind, w, self.in_features, rows, x.data_ptr(), y)
            return y if self.bias is None else y + self.bias
        xf = x.reshape(-1, self.in_features)
        if xf.dtype != torch.float32:
            xf = xf.float()
        if not xf.is_contiguous():
            xf = xf.contiguous()
        y = torch.empty((xf.shape[0], self.out_features), dtype=torch.float32)
        if repack_now:
            r = repack(self.kind, w)
            if r is None:   # (no repacking for this type or shape on this CPU: never asked again)
                object.__setattr__(self, "repack_rows", None)
            else:
                try:
                    return self._finish(x, mul_mat(self.kind, r, xf, y))
                finally:
                    r.close()
        return self._finish(x, mul_mat(self.kind, w, xf, y))

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            y = y.index_select(1, self.perm)
        if x.dtype != torch.float32:
            y = y.to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        how = "repacked " if isinstance(self.blocks, Repacked) else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {how}{self.kind} blocks (ggml)"


def experts_on_blocks(mod: nn.Module) -> bool:
    """Whether a fused experts module (transformers' `use_experts_implementation` contract: `has_gate`,
    `is_transposed`, ...) can compute on its experts' blocks with `block_experts_forward`: [out, in] weights
    (not transposed), gate and up concatenated (or no gate), no biases, no norm after each expert."""
    return (hasattr(mod, "has_gate") and hasattr(mod, "act_fn") and not getattr(mod, "is_transposed", True)
            and getattr(mod, "is_concatenated", False) and not getattr(mod, "has_bias", True)
            and not getattr(mod, "has_post_expert_norm", True) and not getattr(mod, "_is_expert_parallel", False))


def block_experts_forward(mod: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts forward (hidden_states [tokens, hidden], the router's top-k indices and weights)
    computed on each routed expert's GGUF blocks with ggml: `mod.ls_blocks` {expert: {param: (kind, blocks)}}
    holds the experts this call routes to (bound by the streamer's hook). No expert is dequantized or stacked;
    the per-expert math is transformers' eager path (gate and up, `_apply_gate`, down, weighted sum)."""
    blocks = mod.ls_blocks
    up_name = "gate_up_proj" if mod.has_gate else "up_proj"
    x = hidden_states.to(torch.float32)
    out = torch.zeros(x.shape, dtype=torch.float32)
    for e in torch.unique(top_k_index).tolist():
        if not 0 <= e < mod.num_experts:
            continue
        tok, pos = torch.where(top_k_index == e)
        xe = x[tok].contiguous()
        kind, w = blocks[e][up_name]
        h = mul_mat(kind, w, xe, torch.empty((xe.shape[0], w.shape[0]), dtype=torch.float32))
        h = (mod._apply_gate(h) if mod.has_gate else mod.act_fn(h)).contiguous()
        kind, w = blocks[e]["down_proj"]
        y = mul_mat(kind, w, h, torch.empty((h.shape[0], w.shape[0]), dtype=torch.float32))
        out.index_add_(0, tok, y * top_k_weights[tok, pos, None].to(torch.float32))
    return out.to(hidden_states.dtype)
