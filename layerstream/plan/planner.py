"""The residency planner: every unit gets a home tier, fixed for the run.

(Over 400 lines: the plan, its budgets (weights, KV, buffers, prefix cache) and its description, whose numbers
must agree with each other, are kept together.)

Tiers: "device" (resident in compute memory), "ram" (resident in host RAM; pinned and copied to the
device each use on CUDA), "disk" (read every sweep). On a CPU box device and ram coincide and the
planner uses "ram". A cyclic sweep defeats LRU caches, so the resident set is fixed: it gets a hit
rate of budget/model size every sweep.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..errors import BudgetError, InputError
from ..quant import INT4_GGML, float_bytes, stored_names
from ..store import Store
from ..utils import available_ram, fmt_bytes
from .heat import EXPERT_COUNTS, read_expert_counts
from .probes import device_free

RAM_MARGIN = 1_500_000_000      # left free for activations, KV cache, the OS
GPU_MARGIN = 1_000_000_000
# Kept out of a RAM budget that streams, for what is not weights: activations, KV cache, the tokenizer,
# allocator slack (measured on a 31 GB model at max_ram=16GB: ~0.5 GB above weights + in-flight buffers).
RUNTIME_RESERVE = 512_000_000
# The KV cache of the sequences in flight (continuous batching) gets what the budget leaves beside the resident
# units and the in-flight buffers; never less than this, which then comes on top of a budget too small for it
# (as the in-flight buffers do for max_ram=0).
MIN_KV = 256_000_000
PREFIX_SHARE = 4                    # the prefix cache may hold up to 1/4 of the KV budget (evicted on demand) ...
PREFIX_TOKENS = 8192                # ... and at most this many tokens: every sweep attends over the cached columns


@dataclass
class UnitPlan:
    name: str
    kind: str
    bytes: int                 # resident cost
    load: list[str]            # store units read when it is streamed (head of a tied model reads embed too)
    tier: str = "disk"
    tied_embed: bool = False
    heat: int = 0              # experts: how often the router chose it in earlier runs (EXPERT_COUNTS)


@dataclass(frozen=True)
class Machine:
    """The machine facts a plan is a function of (a test passes its own): the RAM free now, bytes."""

    free_ram: int

    @classmethod
    def now(cls) -> Machine:
        return cls(available_ram())


@dataclass
class Plan:
    device: str
    units: list[UnitPlan]
    unit_bytes: dict[str, int]
    ram_budget: int
    gpu_budget: int | None
    lookahead: int
    embed_rows_only: bool = True
    notes: list[str] = field(default_factory=list)
    bandwidth: float | None = None      # bytes/s, when measured (`layerstream plan`)
    dequant_bytes: dict[str, int] = field(default_factory=dict)   # quantized units: their float weights' size
    # streamed units read through the page cache when the rest is read with O_DIRECT: a fixed set sized to
    # the RAM the budget leaves free, which the kernel keeps because O_DIRECT reads never evict it
    cached: list[str] = field(default_factory=list)
    # mixture of experts: expert units are read on demand, when the router has chosen them (never in the
    # sweep's read-ahead); `expert_share` is the expected share of a layer's experts a token uses (top_k / n)
    expert_share: float = 0.0
    expert_topk: int = 0
    kv_per_token: int = 0               # bytes of keys and values per token of one sequence, every layer
    kv_budget: int | None = None        # bytes the KV cache of all sequences in flight may take
    prefix_budget: int = 0              # of which finished requests' KV may keep for reuse (prefix cache)
    staging: int = 1                    # accelerators: pinned staging buffers per size of part read from disk
    expert_device: str | None = None    # "cpu": experts computed by the CPU in host RAM (runtime/experts.py)
    # quantized units whose linear layers compute on their blocks (ggml, quant/kernels.py): never dequantized,
    # resident or streamed at their stored size
    blocks: set[str] = field(default_factory=set)
    free_ram: int = 0                   # the machine's free RAM when the plan was made (Machine.free_ram)
    _by_name: dict | None = field(default=None, repr=False)

    def tier(self, name: str) -> str:
        """A unit's tier (by name, in O(1): called for every part of every load)."""
        if self._by_name is None:
            self._by_name = {u.name: u for u in self.units}
        return self._by_name[name].tier

    def resident(self, tier: str) -> int:
        return sum(u.bytes for u in self.units if u.tier == tier)

    @property
    def compute_tier(self) -> str:
        return "ram" if self.device == "cpu" else "device"

    def parts(self, u: UnitPlan) -> list[str]:
        """Store units that must be brought in for `u` each sweep (its own file, and embed for a tied head).
        A quantized unit passes through the loader even when resident: it is dequantized there."""
        return [n for n in u.load if self.tier(n) != self.compute_tier or n in self.dequant_bytes]

    @property
    def streamed(self) -> list[UnitPlan]:
        """Units brought in each sweep (read from disk, or copied from RAM to the device), in sweep order."""
        return [u for u in self.units
                if u.kind != "expert" and self.parts(u) and not (u.kind == "embed" and self.embed_rows_only)]

    @property
    def bytes_per_sweep(self) -> int:
        """Bytes read from disk per sweep (embedding rows excluded: a few KB; experts: the expected share of
        those on disk, for one token)."""
        experts = sum(u.bytes for u in self.units if u.kind == "expert" and u.tier == "disk")
        return sum(self.unit_bytes[n] for u in self.streamed for n in self.parts(u) if self.tier(n) == "disk") + \
            int(experts * self.expert_share)

    @property
    def inflight_bytes(self) -> int:
        """Load buffers (and dequantized weights) of the `lookahead + 1` largest loads; with experts, the
        read buffers and the stacked weights of one token's routed experts (a long prompt's prefill may
        route to every expert of a layer: up to twice a layer's experts, briefly)."""
        sizes = sorted((sum(self.unit_bytes[n] * (self.tier(n) != self.compute_tier) + self.dequant_bytes.get(n, 0)
                            for n in self.parts(u)) for u in self.streamed), reverse=True)
        experts = [u.bytes + self.dequant_bytes.get(u.name, 0) for u in self.units if u.kind == "expert"]
        if self.expert_device == "cpu" and self.compute_tier == "device":
            experts = []   # computed where they lie, in host RAM: no device buffers (host_inflight_bytes)
        return sum(sizes[: self.lookahead + 1]) + (2 * self.expert_topk * max(experts) if experts else 0)

    @property
    def host_inflight_bytes(self) -> int:
        """Host RAM the loads in flight take (what a RAM budget must hold beside the resident units). On a CPU,
        the in-flight buffers. On an accelerator those are device memory (in the GPU budget); in host RAM only
        the pinned staging buffers that disk reads go through, one per size of the parts read from disk (the
        loader reads one part at a time and its pool keeps them by size), and those of the routed experts on
        disk. A RAM-resident unit is copied to the device from its own pinned memory: it costs its bytes."""
        if self.compute_tier == "ram":
            return self.inflight_bytes
        sizes = {self.unit_bytes[n] for u in self.streamed for n in self.parts(u) if self.tier(n) == "disk"}
        experts = [u.bytes for u in self.units if u.kind == "expert" and u.tier == "disk"]
        return self.staging * sum(sizes) + (2 * self.expert_topk * max(experts) if experts else 0)

    def describe(self) -> str:
        lines = [f"plan on {self.device}: {len(self.units)} units, "
                 f"{fmt_bytes(sum(self.unit_bytes.values()))} in the store"]
        for tier in ("device", "ram", "disk"):
            us = [u.name for u in self.units if u.tier == tier]
            if us:
                size = fmt_bytes(self.resident(tier)) if tier != "disk" else ""
                lines.append(f"  {tier:6s} {len(us):4d} units {size:>10s}  {_compact(us)}")
        lines.append(f"  budgets: ram {fmt_bytes(self.ram_budget)}"
                     + (f", gpu {fmt_bytes(self.gpu_budget)}" if self.gpu_budget is not None else ""))
        cb = sum(self.unit_bytes[n] for n in self.cached)
        lines.append(f"  streamed per sweep: {fmt_bytes(self.bytes_per_sweep)}"
                     + (f" ({fmt_bytes(self.bytes_per_sweep - cb)} from disk, {fmt_bytes(cb)} through the page cache)"
                        if cb else " from disk") + "; "
                     f"in-flight buffers: {fmt_bytes(self.inflight_bytes)} (lookahead {self.lookahead})"
                     + (f", pinned staging in RAM {fmt_bytes(self.host_inflight_bytes)}"
                        if self.compute_tier == "device" else ""))
        if self.cached:
            lines.append(f"  page cache: {len(self.cached)} streamed units ({fmt_bytes(cb)}) read through it, "
                         f"the rest with O_DIRECT  {_compact(self.cached)}")
        if self.bandwidth:
            lines.append(f"  measured read bandwidth {fmt_bytes(self.bandwidth)}/s -> at least "
                         f"{self.bytes_per_sweep / self.bandwidth:.2f} s per token from streaming alone")
        if self.kv_per_token and self.kv_budget is not None:
            tokens = self.kv_budget // self.kv_per_token
            lines.append(f"  KV cache: {fmt_bytes(self.kv_per_token)} per token per sequence; budget "
                         f"{fmt_bytes(self.kv_budget)} ({self.compute_tier}) = {tokens} tokens in flight, e.g. "
                         f"{max(tokens // 1024, 0)} sequences of 1024 (requests wait while it is full); "
                         f"prefix cache up to {fmt_bytes(self.prefix_budget)} "
                         f"({self.prefix_budget // self.kv_per_token} tokens of finished requests kept for reuse)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _compact(names: list[str]) -> str:
    experts = [n for n in names if ".expert." in n]
    if experts:
        layers = len({n.split(".")[1] for n in experts})
        rest = _compact([n for n in names if ".expert." not in n])
        return (rest + ", " if rest else "") + f"{len(experts)} experts of {layers} layers"
    out, run = [], []
    for n in names + [None]:
        if n is not None and n.startswith("layer.") and (not run or int(n[6:]) == int(run[-1][6:]) + 1):
            run.append(n)
            continue
        if run:
            out.append(run[0] if len(run) == 1 else f"layer.{run[0][6:]}-{run[-1][6:]}")
            run = []
        if n is not None and n.startswith("layer."):
            run = [n]
        elif n is not None:
            out.append(n)
    return ", ".join(out)


def _choose(cands: list[UnitPlan], budget: int) -> list[UnitPlan]:
    """The fixed resident set for one tier: the head, then the tied embedding, then decoder layers
    spread evenly (so streaming reads interleave with resident compute), then an untied embedding."""
    if sum(u.bytes for u in cands) <= budget:
        return list(cands)
    chosen, left = [], budget
    for u in [u for u in cands if u.kind == "head"]:
        if u.bytes <= left:
            chosen.append(u)
            left -= u.bytes
    layers = [u for u in cands if u.kind == "layer" and u not in chosen]
    embeds = [u for u in cands if u.kind == "embed" and u not in chosen]
    tied_embed = [u for u in embeds if u.tied_embed]
    for u in tied_embed:
        if u.bytes <= left:
            chosen.append(u)
            left -= u.bytes
    if layers:
        per = max(u.bytes for u in layers)
        k = min(len(layers), left // per)
        if k:
            step = len(layers) / k
            idx = sorted({int(i * step + step / 2) for i in range(k)})
            for i in idx:
                chosen.append(layers[i])
                left -= layers[i].bytes
    # experts last: each is needed by a share of the tokens only. The ones the router chose most often
    # in earlier runs on this store first; without counts, expert 0 of every layer, then expert 1 ...,
    # so every layer's reads shrink alike.
    experts = [u for u in cands if u.kind == "expert" and u not in chosen]
    for u in sorted(experts, key=lambda u: (-u.heat, int(u.name.rsplit(".", 1)[1]), int(u.name.split(".")[1]))):
        if u.bytes <= left:
            chosen.append(u)
            left -= u.bytes
    return chosen


def make_plan(store: Store, device: str = "cpu", max_ram=None, max_gpu_memory=None, lookahead: int = 2,
              packed: bool = False, expert_device: str | None = None, blocks=(),
              machine: Machine | None = None) -> Plan:
    """Each unit's tier for these budgets, on `machine` (default: this one, now: `Machine.now()`).
    blocks: units whose linear layers compute on their stored blocks
    (ggml on a CPU, `runtime.streamer.block_weights`): never dequantized, resident or streamed at their stored
    size. packed (without ggml): int4 units can compute on their blocks (bfloat16 compute on a
    CPU, torch's int4 kernel): they stay packed even where they would fit as floats (smaller, and faster than
    bfloat16 matmuls on a CPU: docs/quantization.md). expert_device="cpu": on an accelerator, experts are never
    placed on the device nor copied to it; they stay in RAM (or on disk) and the CPU computes them."""
    m = store.manifest
    unit_bytes = {u.name: u.bytes for u in m.units}
    tied_embed = head_tied_to_embedding(store)
    units = []
    for u in m.units:
        load = [u.name] + (["embed"] if u.kind == "head" and tied_embed else [])
        units.append(UnitPlan(u.name, u.kind, u.bytes, load, tied_embed=u.kind == "embed" and tied_embed))
    plan = Plan(device, units, unit_bytes, 0, None, lookahead, dequant_bytes=_dequant_bytes(store),
                expert_device=expert_device, free_ram=(machine or Machine.now()).free_ram)
    n_experts = sum(1 for u in units if u.kind == "expert" and u.name.startswith(
        next((x.name for x in units if x.kind == "expert"), "\0").rsplit(".", 1)[0] + "."))
    if n_experts:
        plan.expert_topk = _experts_per_token(store)
        plan.expert_share = min(1.0, plan.expert_topk / n_experts)
        counts = read_expert_counts(store)
        for u in units:
            u.heat = counts.get(u.name, 0)
        if counts:
            plan.notes.append(f"experts ranked by how often the router chose them in earlier runs "
                              f"({sum(counts.values())} expert calls recorded in {EXPERT_COUNTS})")
    # everything streamed: the largest possible in-flight set in host RAM (on an accelerator, its staging)
    inflight = plan.host_inflight_bytes
    if max_ram is None:
        plan.ram_budget = max(0, plan.free_ram - RAM_MARGIN)
        plan.notes.append(f"ram budget by default: free RAM minus {fmt_bytes(RAM_MARGIN)}")
    else:
        plan.ram_budget = max_ram
    # The RAM budget holds the resident units and the buffers of the units in flight; a budget below the
    # in-flight buffers alone (max_ram=0: AirLLM's behaviour) keeps nothing resident and the buffers come on top.
    resident_budget = plan.ram_budget
    reserve = min(RUNTIME_RESERVE, plan.ram_budget // 10)
    if device == "cpu" and blocks:
        plan.blocks = set(blocks) & set(unit_bytes)
        plan.dequant_bytes = {n: b for n, b in plan.dequant_bytes.items() if n not in plan.blocks}
        packed = False
        plan.notes.append(f"{len(plan.blocks)} quantized units computed on their blocks (ggml)")
    if plan.dequant_bytes and device == "cpu":
        dense = sum(plan.dequant_bytes.get(n, b) for n, b in unit_bytes.items())
        if dense <= plan.ram_budget:   # fits dequantized: dequantize once at load, run at full speed
            plan.dequant_bytes = {n: b for n, b in plan.dequant_bytes.items() if packed and n in _int4_units(store)}
            plan.notes.append("int4 units computed on their packed blocks (bfloat16, torch's int4 kernel)"
                              if plan.dequant_bytes else
                              "quantized store dequantized once at load: it fits the budget as floats")
        inflight = plan.inflight_bytes
    if sum(unit_bytes.values()) > plan.ram_budget or plan.dequant_bytes:
        resident_budget = max(0, plan.ram_budget - inflight - reserve)
        if plan.ram_budget < inflight and device == "cpu":
            plan.notes.append(f"the budget is below the in-flight buffers ({fmt_bytes(inflight)}): they come on top")
    if device == "cpu":
        _assign(plan, units, "ram", resident_budget, plan.ram_budget - reserve)
        _cache_tier(plan)
        _kv(plan, store)
        return plan

    # accelerator: device tier first, then pinned RAM
    largest = max(sum(unit_bytes[n] for n in u.load) for u in units if u.kind != "expert")
    cpu_experts = expert_device == "cpu"
    experts = [] if cpu_experts else [u.bytes for u in units if u.kind == "expert"]
    need_inflight = largest * (lookahead + 1) + (2 * plan.expert_topk * max(experts) if experts else 0)
    if max_gpu_memory is None:
        free = device_free(device)
        plan.gpu_budget = max(0, free - GPU_MARGIN)
        plan.notes.append(f"gpu budget by default: free device memory minus {fmt_bytes(GPU_MARGIN)}")
    else:
        plan.gpu_budget = max_gpu_memory
    if plan.gpu_budget < need_inflight and \
            sum(u.bytes for u in units if not (cpu_experts and u.kind == "expert")) > plan.gpu_budget:
        raise BudgetError(f"max_gpu_memory {fmt_bytes(plan.gpu_budget)} cannot hold the units in flight: "
                          f"{lookahead + 1} x {fmt_bytes(largest)}"
                          + (f" + routed experts {fmt_bytes(need_inflight - largest * (lookahead + 1))}" if experts
                             else "") + f" = {fmt_bytes(need_inflight)} needed at least "
                          f"(raise the budget or lower lookahead)")
    cands = [u for u in units if not (cpu_experts and u.kind == "expert")]
    on_device = _choose(cands, plan.gpu_budget) if sum(u.bytes for u in cands) <= plan.gpu_budget else \
        _choose(cands, plan.gpu_budget - need_inflight)
    for u in on_device:
        u.tier = "device"
    _assign(plan, [u for u in units if u.tier == "disk"], "ram", resident_budget, plan.ram_budget)
    # a second staging buffer per size lets a read fill one while the other's copy to the device runs: taken
    # where the buffers come on top of the budget anyway (max_ram=0), or where the budget has room left for it
    one = plan.host_inflight_bytes
    if one and (plan.ram_budget < one or plan.ram_budget - plan.resident("ram") >= 2 * one):
        plan.staging = 2
    if plan.ram_budget < plan.resident("ram") + plan.host_inflight_bytes:
        plan.notes.append(f"the budget is below the pinned staging buffers ({fmt_bytes(plan.host_inflight_bytes)}): "
                          f"they come on top")
    _kv(plan, store)
    return plan


def prefix_budget(kv_budget: int, kv_per_token: int) -> int:
    """The prefix cache's default share of a KV budget (bytes)."""
    return min(kv_budget // PREFIX_SHARE, PREFIX_TOKENS * kv_per_token)


def kv_bytes_per_token(cfg: dict, itemsize: int) -> int:
    """Keys and values of one token over every layer: 2 x layers x kv heads x head dim x element size."""
    cfg = cfg.get("text_config") or cfg
    heads = cfg.get("num_key_value_heads") or cfg.get("num_attention_heads") or 1
    head_dim = cfg.get("head_dim") or cfg.get("hidden_size", 0) // max(cfg.get("num_attention_heads") or 1, 1)
    return 2 * (cfg.get("num_hidden_layers") or 0) * heads * head_dim * itemsize


def _kv(plan: Plan, store: Store) -> None:
    """The KV budget: what the RAM (CPU) or GPU budget leaves beside resident units and in-flight buffers."""
    cfg = json.loads((store.path / "config.json").read_text())
    itemsize = torch.empty(0, dtype=getattr(torch, store.manifest.dtype)).element_size()
    plan.kv_per_token = kv_bytes_per_token(cfg, itemsize)
    if plan.compute_tier == "ram":
        left = plan.ram_budget - plan.resident("ram") - plan.inflight_bytes
    else:
        left = (plan.gpu_budget or 0) - plan.resident("device") - plan.inflight_bytes
    plan.kv_budget = max(left, MIN_KV)
    if left < MIN_KV:
        plan.notes.append(f"the budget leaves {fmt_bytes(max(left, 0))} for the KV cache: it gets the minimum, "
                          f"{fmt_bytes(MIN_KV)}, on top")
    plan.prefix_budget = prefix_budget(plan.kv_budget, plan.kv_per_token)


def _cache_tier(plan: Plan) -> None:
    """Streamed units for the page cache: as many as the free RAM left beside the budget holds (minus a
    margin), spread evenly. Used only when the others are read with O_DIRECT (they then never evict these)."""
    streamed = [u for u in plan.streamed if u.kind == "layer"]
    if not streamed:
        return
    room = plan.free_ram - plan.ram_budget - RAM_MARGIN
    per = max(plan.unit_bytes[u.name] for u in streamed)
    k = min(len(streamed), max(0, room) // per)
    if k:
        step = len(streamed) / k
        plan.cached = [streamed[int(i * step + step / 2)].name for i in range(k)]


def _assign(plan: Plan, cands: list[UnitPlan], tier: str, first: int, budget: int) -> None:
    """Make `first` bytes of `cands` resident in `tier`; then, while the real in-flight buffers in host RAM
    (smaller than the worst case assumed, once the largest units are resident) leave room, take more."""
    for u in _choose(cands, first):
        u.tier = tier
    for _ in range(3):
        room = budget - plan.host_inflight_bytes
        if room <= plan.resident(tier):
            return
        before = [u.tier for u in cands]
        for u in cands:
            u.tier = "disk"
        for u in _choose(cands, room):
            u.tier = tier
        if plan.resident(tier) + plan.host_inflight_bytes > budget:
            for u, t in zip(cands, before):
                u.tier = t
            return


def _dequant_bytes(store: Store) -> dict[str, int]:
    if not store.manifest.quantization:
        return {}
    dtype = getattr(torch, store.manifest.dtype)
    out = {}
    for u in store.manifest.units:
        quant = stored_names(u.tensors)
        if quant:
            out[u.name] = float_bytes({s.name: s.shape for s in store.slots(u.name)}, quant, dtype)
    return out


def _int4_units(store: Store) -> set[str]:
    """Units whose quantized weights are all int4 blocks (the kind torch's int4 kernel computes on)."""
    out = set()
    for u in store.manifest.units:
        kinds = {kind for kind, _ in stored_names(u.tensors).values()}
        if kinds and kinds <= {"int4", *INT4_GGML} and u.kind != "expert":   # a GGUF's 4-bit blocks in place too
            out.add(u.name)
    return out


def _experts_per_token(store: Store) -> int:
    cfg = json.loads((store.path / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    for k in ("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token"):
        if isinstance(cfg.get(k), int):
            return cfg[k]
    return 1


def head_tied_to_embedding(store: Store) -> bool:
    """Whether the head's weight is the embedding's (tied): then whoever runs the head loads the embedding."""
    emb = next((u for u in store.manifest.units if u.kind == "embed"), None)
    prefix = emb.tensors[0].rsplit(".", 1)[0] if emb and emb.tensors else "\0"
    return any(owner.startswith(prefix) for owner in store.manifest.tied.values())


def choose_io(io: str, plan: Plan) -> tuple[bool, list[str]]:
    """(O_DIRECT?, the streamed units read through the page cache) for an `io` mode.

    O_DIRECT when what is streamed each sweep cannot stay in the page cache anyway (the model is larger
    than RAM): reads skip the copy through the cache and evict nothing; the plan's fixed page-cache set
    (`plan.cached`) is then still read buffered. Buffered while it fits: a page-cache hit is faster than
    any disk. "fadvise": buffered reads dropped after use, the page-cache set kept as planned."""
    if io not in ("auto", "buffered", "direct", "fadvise", "mmap"):
        raise InputError(f"io must be 'auto', 'buffered', 'direct', 'fadvise' or 'mmap', got {io!r}")
    if io == "fadvise":
        return False, list(plan.cached)
    if io != "auto":
        return io == "direct", []   # an explicit choice applies to every streamed unit ("mmap": buffered, mapped)
    streamed = plan.bytes_per_sweep
    room = plan.free_ram - plan.host_inflight_bytes - plan.resident("ram")   # host RAM on any device
    if not (streamed > 0 and streamed > 0.8 * max(0, room)):
        return False, []
    return True, list(plan.cached)
