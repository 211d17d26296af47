"""`layerstream plan`: the residency plan for budgets, and the least time per token streaming allows."""

from __future__ import annotations

from ..utils import log


def cmd_plan(a) -> int:
    log("importing torch and transformers …")
    from ..plan import choose_io, make_plan, measure_read_bandwidth
    from ..store import Store, resolve
    from ..utils import parse_size

    store = Store(resolve(a.source, store_path=a.store))
    device = a.device.split(":")[0]
    weights = {}   # units computing on their blocks -> their weights (block_weights)
    import torch

    from ..engine.model import use_kernels
    if use_kernels(None, torch.device(device), store):   # as the model would: its linear layers on their blocks
        from transformers import AutoConfig

        from ..arch import build_skeleton
        from ..runtime.streamer import block_weights
        skeleton = build_skeleton(AutoConfig.from_pretrained(store.path), getattr(torch, store.manifest.dtype),
                                  torch.device(device))
        weights = block_weights(skeleton, store)
    plan = make_plan(store, device, parse_size(a.max_ram, "--max-ram"),
                     parse_size(a.max_gpu_memory, "--max-gpu-memory"), a.lookahead, blocks=set(weights))
    if weights:
        from ..runtime.streamer import repack_note
        note = repack_note(store, plan, weights)
        if note:
            plan.notes.append(note)
    direct, plan.cached = choose_io("auto", plan)
    if not direct:
        plan.notes.append("streamed units fit in the page cache: read through it (io auto)")
    else:
        plan.notes.append("streamed units do not fit in the page cache: O_DIRECT reads (io auto)")
    if plan.bytes_per_sweep and not a.no_measure:
        log("measuring the read bandwidth of the store (O_DIRECT, 4 readers, ~2 s) …")
        plan.bandwidth = measure_read_bandwidth(store)
    from ..engine.model import compute_threads, threads_note
    from ..utils import idle_cores

    # as the model would choose them on this device (a CPU's streamed units are mapped, costing no copies)
    idle = idle_cores()
    n = compute_threads(None, streaming=bool(plan.streamed), direct=direct or device == "cpu", idle=idle)
    plan.notes.append(threads_note(n, None, idle))
    print(plan.describe())
    return 0
