"""Larger than RAM, on CPU: layerstream against its peers on a ~31 GB Llama-shaped model, in one run.

The model (random weights, bf16, hidden 5120, intermediate 13824, 40 heads, 8 KV heads, vocab 49152,
untied embeddings, 54 layers by default: about 31 GB on a 24 GiB machine) is written once by
``--make`` into ``--dir`` as a transformers checkpoint with ONE DECODER LAYER PER SHARD (embeddings,
final norm and head in shards of their own), so that AirLLM 4.0 links its split instead of copying
it and layerstream serves the shards in place, plus ``model.gguf`` with the same weights for
llama.cpp (bench/big_gguf.py). Both are written tensor by tensor and reused once complete (marker
files written last); an interrupted ``--make`` resumes at the first unfinished shard.

Then, in the same run:
  1. the disk's sequential read bandwidth: O_DIRECT reads of the model's shards (page cache dropped
     first), 1 reader and 4 parallel readers (threads, os.preadv, 16 MB aligned buffers); the best
     figure is the bandwidth of the "limit";
  2. every system in its own fresh subprocess, the page cache dropped before each, greedy generation
     of ``-n`` tokens from "The sea is": setup (load) time, time to the first token (prefill) and
     seconds per decode token = (time of token n - time of token 1) / (n - 1), peak RSS, and bytes
     the process read from disk (/proc/self/io read_bytes):
       ls       layerstream, max_ram = --budget (default 16GB)
       lsdef    layerstream, default budget (max_ram=None)
       offload  transformers + Accelerate disk offload, bf16, max_memory={"cpu": budget}
       airllm   AirLLM 4.0.0, CPU, bf16, use_cache=True
       llama    llama.cpp (llama-cpp-python), the GGUF, mmap, 2 threads
     layerstream's in-place index (a checksum of the whole model, once) and AirLLM's split (links)
     are made beforehand, in untimed subprocesses;
  3. a table, the ratios, and the targets: layerstream decode <= 1.15x the limit (bytes streamed
     per token / best bandwidth); at max_ram=16GB >= 1.3x Accelerate, >= 1.7x llama.cpp, >= 2x
     AirLLM; at the default budget >= 2x llama.cpp and >= 3x AirLLM; peak RSS <= budget + 300 MB.

Absolute times on a shared 2-core machine mean little: the "others" column says how busy the machine
was with other processes while a system ran (> 0.2 cores: the figure is disturbed).

Run (as root, to drop the page cache):
    python bench/big.py --make-only                     # once: ~31 GB checkpoint + ~31 GB GGUF
    python bench/big.py --json bench/out/big.json       # the benchmark (tens of minutes)
Small-scale check of the machinery:
    python bench/big.py --make --layers 4 --dir /tmp/bigsmall --budget 1GB --bw-bytes 1GB
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from big_gguf import drop_file_cache  # noqa: E402
from cpuload import cpu_snapshot, foreign_load, wait_until_quiet  # noqa: E402

SYSTEMS = {"ls": "layerstream max_ram=BUDGET", "lsdef": "layerstream default budget",
           "offload": "accelerate disk offload", "airllm": "airllm 4.0.0", "llama": "llama.cpp"}
PROMPT = "The sea is"
CKPT_MARKER = ".checkpoint-complete.json"
GGUF_MARKER = ".gguf-complete.json"
PARAMS_FILE = ".make-params.json"
GGUF_NAME = "model.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
STD = 0.02
SEED = 1234

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(s) -> int:
    """Bytes from "16GB" (10^9), "1.5GiB" (2^30), "512MB", or a plain number (layerstream's convention)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(s))
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"cannot parse size {s!r}; use e.g. 16GB, 1.5GiB, 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def fmt_b(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}" if unit == "GB" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

def model_config(layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 5120,
            "intermediate_size": 13824, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
            "num_hidden_layers": layers, "vocab_size": 49152, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "tie_word_embeddings": False, "initializer_range": STD, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 2, "use_cache": True, "dtype": "bfloat16", "pretraining_tp": 1}


def shard_plan(layers: int) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """[(shard file name, [(tensor name, shape), ...])]: embeddings, one shard per decoder layer, the final
    norm, the head. Tensors in forward order within a shard."""
    c = model_config(layers)
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    q = c["num_attention_heads"] * c["head_dim"]
    groups = [[("model.embed_tokens.weight", (v, h))]]
    for n in range(layers):
        p = f"model.layers.{n}."
        groups.append([(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                       (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                       (p + "self_attn.o_proj.weight", (h, q)), (p + "post_attention_layernorm.weight", (h,)),
                       (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                       (p + "mlp.down_proj.weight", (h, i))])
    groups.append([("model.norm.weight", (h,))])
    groups.append([("lm_head.weight", (v, h))])
    m = len(groups)
    return [(f"model-{k + 1:05d}-of-{m:05d}.safetensors", g) for k, g in enumerate(groups)]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def safetensors_header(tensors) -> tuple[bytes, int]:
    """The header of a safetensors file holding `tensors` (bf16) back to back, as safetensors writes it
    (JSON padded with spaces to 8 bytes), and the size of the data that follows."""
    meta, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = _numel(shape) * 2
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(meta, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h, off


def make_tensor(name: str, shape, seed: int = SEED):
    """Deterministic per (seed, name): N(0, 0.02) in bf16; norms are ones."""
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, STD, generator=g)


def _fsync_dir(d) -> None:
    fd = os.open(str(d), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_bytes(layers: int) -> int:
    return sum(len(safetensors_header(t)[0]) + safetensors_header(t)[1] for _, t in shard_plan(layers))


def gguf_bytes_estimate(layers: int) -> int:
    return checkpoint_bytes(layers) + 12_000_000          # + tokenizer metadata and padding


def checkpoint_complete(d: pathlib.Path, layers: int | None = None) -> dict | None:
    """The checkpoint marker's contents when the checkpoint in `d` is complete (and of `layers`)."""
    try:
        info = json.loads((d / CKPT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if layers is not None and info.get("layers") != layers:
        return None
    for name, size in info["files"].items():
        try:
            if (d / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return info


def gguf_complete(d: pathlib.Path) -> dict | None:
    try:
        info = json.loads((d / GGUF_MARKER).read_text())
        return info if (d / GGUF_NAME).stat().st_size == info["bytes"] else None
    except (OSError, ValueError, KeyError):
        return None


def make(d: pathlib.Path, layers: int, gguf: bool, gguf_type: str) -> None:
    """Write the checkpoint (shard by shard, tensor by tensor; resumable) and the GGUF, once."""
    import torch
    from tqdm import tqdm

    d.mkdir(parents=True, exist_ok=True)
    params = {"layers": layers, "seed": SEED, "std": STD, "config": model_config(layers)}
    pf = d / PARAMS_FILE
    if pf.is_file():
        old = json.loads(pf.read_text())
        if old != params:
            sys.exit(f"big.py: error: {d} holds (part of) a model made with other parameters "
                     f"(layers={old.get('layers')}); pass another --dir or delete it")
    plan = shard_plan(layers)
    done_ckpt = checkpoint_complete(d, layers) is not None
    done_gguf = (not gguf) or gguf_complete(d) is not None
    if done_ckpt and done_gguf:
        print(f"model already complete in {d} (checkpoint{' + GGUF' if gguf else ''})", flush=True)
        return

    # disk: what is still to write must fit, with 2 GB to spare
    sizes = {f: len(safetensors_header(t)[0]) + safetensors_header(t)[1] for f, t in plan}
    need_ckpt = 0 if done_ckpt else sum(s for f, s in sizes.items()
                                        if not ((d / f).is_file() and (d / f).stat().st_size == s))
    need_gguf = 0 if done_gguf else gguf_bytes_estimate(layers)
    free = shutil.disk_usage(d).free
    need = need_ckpt + need_gguf + 2_000_000_000
    print(f"model: {layers} layers, checkpoint {fmt_b(sum(sizes.values()))} in {len(plan)} shards"
          + (f" + GGUF ({gguf_type}) ~{fmt_b(gguf_bytes_estimate(layers))}" if gguf else "")
          + f"; still to write {fmt_b(need_ckpt + need_gguf)}; {fmt_b(free)} free on {d}", flush=True)
    if need > free:
        sys.exit(f"big.py: error: not enough disk in {d}: {fmt_b(need_ckpt)} checkpoint + {fmt_b(need_gguf)} GGUF "
                 f"+ 2 GB margin = {fmt_b(need)} needed, {fmt_b(free)} free. Free space, pass fewer --layers, "
                 f"or --no-gguf (llama.cpp is then skipped)")
    pf.write_text(json.dumps(params, indent=1))

    if not done_ckpt:
        t0 = time.perf_counter()
        torch.set_num_threads(1)
        bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="checkpoint", file=sys.stderr,
                   mininterval=1.0)
        for fname, tensors in plan:
            path = d / fname
            if path.is_file() and path.stat().st_size == sizes[fname]:
                bar.update(sizes[fname])
                continue
            header, _ = safetensors_header(tensors)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(header)
                bar.update(len(header))
                for name, shape in tensors:
                    t = make_tensor(name, shape)
                    f.write(t.view(torch.uint8).numpy().data)
                    bar.update(t.numel() * 2)
                    del t
                f.flush()
                os.fsync(f.fileno())
            drop_file_cache(tmp)
            os.replace(tmp, path)
        bar.close()
        weight_map = {n: f for f, ts in plan for n, _ in ts}
        index = {"metadata": {"total_size": sum(_numel(s) * 2 for _, ts in plan for _, s in ts)},
                 "weight_map": weight_map}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (d / "config.json").write_text(json.dumps({**model_config(layers), "transformers_version": "5.24.0"},
                                                  indent=2))
        (d / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "do_sample": False}, indent=2))
        _copy_tokenizer(d)
        _fsync_dir(d)
        info = {"layers": layers, "files": {f: sizes[f] for f in sizes}, "bytes": sum(sizes.values()),
                "seconds": time.perf_counter() - t0}
        (d / CKPT_MARKER).write_text(json.dumps(info, indent=1))
        _fsync_dir(d)
        print(f"checkpoint written: {fmt_b(info['bytes'])} in {info['seconds']:.0f} s", flush=True)

    if not done_gguf:
        import big_gguf

        t0 = time.perf_counter()
        size = big_gguf.write_gguf(d, d / GGUF_NAME, dtype=gguf_type)
        info = {"bytes": size, "dtype": gguf_type, "seconds": time.perf_counter() - t0}
        (d / GGUF_MARKER).write_text(json.dumps(info, indent=1))
        _fsync_dir(d)
        print(f"GGUF written: {fmt_b(size)} ({gguf_type}) in {info['seconds']:.0f} s", flush=True)


def _copy_tokenizer(d: pathlib.Path) -> None:
    """The tokenizer of the embedded SmolLM2 (vocab 49152), from its layerstream store."""
    from layerstream.split import resolve

    store = pathlib.Path(resolve(None, progress=False))
    copied = []
    for name in TOKENIZER_FILES:
        if (store / name).is_file():
            shutil.copyfile(store / name, d / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        sys.exit(f"big.py: error: no tokenizer.json in {store}")


# ----------------------------------------------------------------------------------------------
# Machine: page cache, CPU load, disk bandwidth
# ----------------------------------------------------------------------------------------------

def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False




def read_bandwidth(files: list[pathlib.Path], readers: int, limit: int, chunk: int = 16 << 20) -> dict:
    """O_DIRECT sequential reads of `files` (in order, up to `limit` bytes) by `readers` threads taking
    16 MB chunks in turn (so parallel readers read neighbouring chunks: a queue depth of `readers`)."""
    jobs, total = [], 0
    for f in files:
        size = f.stat().st_size
        off = 0
        while off < size and total < limit:
            jobs.append((f, off))
            n = min(chunk, size - off)
            off += chunk
            total += n
        if total >= limit:
            break
    lock, nxt, got, errors = threading.Lock(), [0], [0] * readers, []

    def work(k):
        buf = mmap.mmap(-1, chunk)        # page-aligned
        fds = {}
        try:
            while True:
                with lock:
                    if nxt[0] >= len(jobs):
                        return
                    f, off = jobs[nxt[0]]
                    nxt[0] += 1
                if f not in fds:
                    fds[f] = os.open(str(f), os.O_RDONLY | getattr(os, "O_DIRECT", 0))
                got[k] += os.preadv(fds[f], [buf], off)
        except OSError as e:
            errors.append(e)
        finally:
            for fd in fds.values():
                os.close(fd)
            buf.close()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(readers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return {"readers": readers, "bytes": sum(got), "seconds": dt, "gb_s": sum(got) / dt / 1e9,
            "files": f"{jobs[0][0].name}..{jobs[-1][0].name}" if jobs else ""}


def measure_bandwidth(d: pathlib.Path, limit: int, start: int = 0) -> tuple[list[dict], int]:
    """1 reader, then 4 readers, each over different decoder-layer shards (page cache dropped before each):
    the first from byte `start` of the layer shards taken in order (wrapping around), the next where the
    previous stopped. Returns the results and where the next measurement should start."""
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted({d / f for f in index["weight_map"].values()})
    layer_shards = shards[1:-2] or shards
    sizes = [f.stat().st_size for f in layer_shards]
    out = []
    for readers in (1, 4):
        k, acc = 0, 0
        pos = start % max(1, sum(sizes))
        while k < len(sizes) - 1 and acc + sizes[k] <= pos:
            acc += sizes[k]
            k += 1
        files = layer_shards[k:] + layer_shards[:k]
        drop_caches()
        r = read_bandwidth(files, readers, limit)
        start = acc + r["bytes"]
        out.append(r)
    return out, start


# ----------------------------------------------------------------------------------------------
# Children: one system each
# ----------------------------------------------------------------------------------------------

def _read_bytes() -> int | None:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Meter:
    """Timestamps and bytes read at each generated token (a logits processor for transformers'
    generate, or called by the llama.cpp loop)."""

    def __init__(self):
        self.t0 = self.io0 = None
        self.stamps: list[tuple[float, int | None]] = []

    def start(self):
        self.stamps = []
        self.io0 = _read_bytes()
        self.t0 = time.perf_counter()

    def mark(self):
        self.stamps.append((time.perf_counter(), _read_bytes()))

    def processor(self):
        from transformers import LogitsProcessor, LogitsProcessorList

        meter = self

        class Stamp(LogitsProcessor):
            def __call__(self, input_ids, scores):
                meter.mark()
                return scores

        return LogitsProcessorList([Stamp()])

    def result(self) -> dict:
        s = self.stamps
        n = len(s)
        first = s[0][0] - self.t0 if n else None
        decode = (s[-1][0] - s[0][0]) / (n - 1) if n > 1 else None
        io_first = (s[0][1] - self.io0) if n and self.io0 is not None and s[0][1] is not None else None
        io_decode = ((s[-1][1] - s[0][1]) / (n - 1)) if n > 1 and s[0][1] is not None else None
        return {"first_s": first, "decode_s": decode, "gen_s": (s[-1][0] - self.t0) if n else None,
                "read_prefill": io_first, "read_per_token": io_decode,
                "token_s": [round(b[0] - a[0], 3) for a, b in zip(s, s[1:])]}


def child(key: str, a) -> dict:
    import resource

    import torch
    from transformers import AutoTokenizer

    d = a.dir
    tok = AutoTokenizer.from_pretrained(str(d))
    ids = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    if key in ("ls", "lsdef"):          # the system's own imports count in the baseline
        import layerstream  # noqa: F401
    elif key == "offload":
        import accelerate  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401
    elif key == "airllm":
        import airllm  # noqa: F401
    elif key == "llama":
        import llama_cpp  # noqa: F401
    base_rss = _rss_now()
    meter = Meter()
    r = {"key": key, "name": SYSTEMS[key].replace("BUDGET", fmt_b(a.budget).replace(" ", "")),
         "tokens": None, "base_rss": base_rss, "prompt_tokens": ids.shape[1]}
    note = []
    t0 = time.perf_counter()
    if key in ("ls", "lsdef"):
        from layerstream import AutoModel

        m = AutoModel.from_pretrained(str(d), max_ram=a.budget if key == "ls" else None,
                                      store_path=str(d / "ls-store"), progress=False)
        r["setup_s"] = time.perf_counter() - t0
        meter.start()
        out = m.generate(ids, max_new_tokens=a.new_tokens, do_sample=False, logits_processor=meter.processor())
        plan = m.plan
        r["bytes_per_sweep"] = plan.bytes_per_sweep
        r["ram_budget"] = getattr(plan, "ram_budget", None)
        r["direct"] = getattr(m, "direct", None)
        r["last_stats"] = {k: v for k, v in (m.last_stats or {}).items() if isinstance(v, (int, float))}
        r["plan"] = plan.describe()
        note.append(f"bf16; {fmt_b(plan.bytes_per_sweep)} streamed per sweep; O_DIRECT={r['direct']}; "
                    f"torch threads={torch.get_num_threads()}; layerstream counted "
                    f"{fmt_b(r['last_stats'].get('bytes_per_token'))}/token")
    elif key == "offload":
        from transformers import AutoModelForCausalLM

        tmp = d / "offload-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16, device_map="auto",
                                                         max_memory={"cpu": a.budget}, offload_folder=str(tmp)).eval()
            r["setup_s"] = time.perf_counter() - t0
            placement = {}
            for where in model.hf_device_map.values():
                placement[str(where)] = placement.get(str(where), 0) + 1
            meter.start()
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                                     do_sample=False, pad_token_id=2, logits_processor=meter.processor())
            files = sum(1 for p in tmp.rglob("*") if p.is_file())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        r["placement"] = placement
        note.append(f"bf16; max_memory cpu={fmt_b(a.budget)}; hf_device_map {placement}; offload_folder files={files}; "
                    f"torch threads={torch.get_num_threads()}")
    elif key == "airllm":
        import airllm

        model = airllm.AutoModel.from_pretrained(str(d), device="cpu", dtype=torch.bfloat16)
        r["setup_s"] = time.perf_counter() - t0
        meter.start()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=a.new_tokens, use_cache=True, return_dict_in_generate=True,
                                 logits_processor=meter.processor())
        out = out.sequences if hasattr(out, "sequences") else out
        note.append(f"bf16, device=cpu, prefetching on; split: {airllm_split_report(d)}; "
                    f"torch threads={torch.get_num_threads()}")
    elif key == "llama":
        from llama_cpp import Llama

        gguf = d / GGUF_NAME
        llm = Llama(model_path=str(gguf), n_ctx=256, n_threads=2, n_threads_batch=2, use_mmap=True, verbose=False)
        r["setup_s"] = time.perf_counter() - t0
        eos = llm.token_eos()
        got = []
        meter.start()
        for t in llm.generate(ids[0].tolist(), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                              reset=True):
            meter.mark()
            if t == eos:
                break
            got.append(int(t))
            if len(got) >= a.new_tokens:
                break
        out = torch.tensor([ids[0].tolist() + got])
        info = gguf_complete(d) or {}
        note.append(f"GGUF {info.get('dtype', '?')}, mmap, n_threads=2, greedy (top_k=1)")
    else:
        raise ValueError(key)
    r.update(meter.result())
    r["tokens"] = out[0, ids.shape[1]:].tolist()
    r["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    r["note"] = "; ".join(note)
    return r


def airllm_split_report(d: pathlib.Path) -> str:
    """How AirLLM's split relates to the checkpoint: hard links, symlinks or copies (and their bytes)."""
    sp = d / "splitted_model"
    if not sp.is_dir():
        return "no splitted_model/"
    src_inodes = {(p.stat().st_dev, p.stat().st_ino) for p in d.glob("model-*.safetensors")}
    hard = sym = copies = 0
    copied = 0
    for p in sp.glob("*.safetensors"):
        if p.is_symlink():
            sym += 1
            continue
        st = p.stat()
        if (st.st_dev, st.st_ino) in src_inodes:
            hard += 1
        else:
            copies += 1
            copied += st.st_size
    return f"{hard} hard links, {sym} symlinks, {copies} copies ({fmt_b(copied)} copied)"


def prep(what: str, a) -> dict:
    """Untimed one-time preparation, each in its own subprocess."""
    t0 = time.perf_counter()
    if what == "ls":
        from layerstream.split import resolve

        path = resolve(str(a.dir), store_path=str(a.dir / "ls-store"), progress=True)
        return {"what": "layerstream index", "path": str(path), "seconds": time.perf_counter() - t0}
    if what == "airllm":
        import airllm
        import torch

        airllm.AutoModel.from_pretrained(str(a.dir), device="cpu", dtype=torch.bfloat16)
        return {"what": "airllm split", "seconds": time.perf_counter() - t0, "split": airllm_split_report(a.dir)}
    raise ValueError(what)


# ----------------------------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------------------------

def _self_cmd(a, *extra) -> list[str]:
    return [sys.executable, str(pathlib.Path(__file__).resolve()), "--dir", str(a.dir), "--layers", str(a.layers),
            "--budget", str(a.budget), "-n", str(a.new_tokens), *extra]


def run_child(key: str, a, logdir: pathlib.Path) -> dict:
    dropped = drop_caches()
    before = cpu_snapshot()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(_self_cmd(a, "--child", key), capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired as e:
        out = lambda x: x.decode(errors="replace") if isinstance(x, bytes) else (x or "")  # noqa: E731
        proc = subprocess.CompletedProcess(e.cmd, -9, out(e.stdout), out(e.stderr) + f"\ntimed out after {a.timeout} s")
    wall = time.perf_counter() - t0
    after = cpu_snapshot()
    (logdir / f"{key}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        r = {"key": key, "name": SYSTEMS[key].replace("BUDGET", fmt_b(a.budget).replace(" ", "")), "tokens": None,
             "note": f"failed (exit {proc.returncode}): {tail[:300]}; log {logdir / (key + '.log')}"}
    else:
        r = json.loads(line[7:])
    r["wall_s"] = wall
    r["others"] = foreign_load(before, after)
    r["cache_dropped"] = dropped
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/work/bigmodel"))
    p.add_argument("--layers", type=int, default=54)
    p.add_argument("--budget", type=parse_size, default=parse_size("16GB"), help="max_ram of layerstream and "
                   "Accelerate's max_memory (default 16GB = 16e9 bytes)")
    p.add_argument("-n", "--new-tokens", type=int, default=4)
    p.add_argument("--make", action="store_true", help="write the model (checkpoint + GGUF) if not complete, then run")
    p.add_argument("--make-only", action="store_true", help="write the model if not complete, and stop")
    p.add_argument("--no-gguf", action="store_true", help="with --make: no GGUF (llama.cpp is then skipped)")
    p.add_argument("--gguf-type", default="bf16", choices=["bf16", "f16"])
    p.add_argument("--skip", action="append", default=[], choices=list(SYSTEMS))
    p.add_argument("--bw-bytes", type=parse_size, default=parse_size("6GB"),
                   help="bytes read by each bandwidth measurement (default 6GB)")
    p.add_argument("--wait-quiet", type=float, default=60.0, metavar="SECONDS",
                   help="before each system, wait up to this long for other processes to leave the CPUs idle")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to each system (default 3600)")
    p.add_argument("--json", type=pathlib.Path)
    p.add_argument("--child", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    p.add_argument("--prep", choices=["ls", "airllm"], help=argparse.SUPPRESS)
    p.add_argument("--do-make", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.new_tokens < 2:
        p.error("-n must be at least 2 (decode time needs a second token)")

    if a.child:
        print("RESULT " + json.dumps(child(a.child, a)), flush=True)
        return 0
    if a.prep:
        print("RESULT " + json.dumps(prep(a.prep, a)), flush=True)
        return 0
    if a.do_make:
        make(a.dir, a.layers, gguf=not a.no_gguf, gguf_type=a.gguf_type)
        return 0

    if a.make or a.make_only:
        t0 = time.perf_counter()
        rc = subprocess.run(_self_cmd(a, "--do-make", "--gguf-type", a.gguf_type,
                                      *(["--no-gguf"] if a.no_gguf else []))).returncode
        if rc:
            return rc
        print(f"--make: {time.perf_counter() - t0:.0f} s", flush=True)
        if a.make_only:
            return 0
    if checkpoint_complete(a.dir, a.layers) is None:
        sys.exit(f"big.py: error: no complete {a.layers}-layer model in {a.dir}; run with --make first")
    if os.geteuid() != 0:
        print("warning: not root: the page cache cannot be dropped; figures will include cached reads", flush=True)
    systems = [k for k in SYSTEMS if k not in a.skip]
    if "llama" in systems and gguf_complete(a.dir) is None:
        print(f"llama.cpp skipped: no complete {GGUF_NAME} in {a.dir} (made without --no-gguf?)", flush=True)
        systems.remove("llama")
    if "llama" in systems and subprocess.run([sys.executable, "-c", "import llama_cpp"],
                                             capture_output=True).returncode != 0:
        print("llama.cpp skipped: llama_cpp is not installed", flush=True)
        systems.remove("llama")
    logdir = a.dir / "bench-logs"
    logdir.mkdir(exist_ok=True)
    ckpt = checkpoint_complete(a.dir)
    print(f"model: {a.dir}, {a.layers} layers, {fmt_b(ckpt['bytes'])} bf16; RAM "
          f"{fmt_b(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))}; budget {fmt_b(a.budget)}; "
          f"{a.new_tokens} new tokens from {PROMPT!r}, greedy", flush=True)

    # one-time preparation, untimed
    preps = {}
    for what in (["ls"] if {"ls", "lsdef"} & set(systems) else []) + (["airllm"] if "airllm" in systems else []):
        t0 = time.perf_counter()
        proc = subprocess.run(_self_cmd(a, "--prep", what), stdout=subprocess.PIPE, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        preps[what] = json.loads(line[7:]) if line else {"failed": proc.returncode}
        print(f"prep {what}: {time.perf_counter() - t0:.0f} s {preps[what]}", flush=True)

    bw, next_start = measure_bandwidth(a.dir, a.bw_bytes)
    for r in bw:
        print(f"disk: {r['readers']} O_DIRECT reader(s), 16 MB chunks: {r['gb_s']:.2f} GB/s "
              f"({fmt_b(r['bytes'])} in {r['seconds']:.1f} s)", flush=True)

    results = []
    for key in systems:
        load = wait_until_quiet(a.wait_quiet) if a.wait_quiet > 0 else None
        print(f"running {key} ...", flush=True)
        r = run_child(key, a, logdir)
        r["load_before"] = load
        results.append(r)
        if r.get("decode_s"):
            print(f"  {r['name']}: setup {r['setup_s']:.1f} s, first token {r['first_s']:.1f} s, "
                  f"{r['decode_s']:.2f} s/token, peak RSS {fmt_b(r['peak_rss'])} "
                  f"(others {r['others'] or 0:.2f} cores)", flush=True)
        else:
            print(f"  {r['name']}: {r.get('note')}", flush=True)

    bw += measure_bandwidth(a.dir, a.bw_bytes, next_start)[0]
    for r in bw[2:]:
        print(f"disk again: {r['readers']} reader(s): {r['gb_s']:.2f} GB/s", flush=True)
    # A decode sweep re-reads the same units every token; this virtual disk serves re-reads faster than
    # first reads (its host caches them), so measure that case too: the same bytes read twice, O_DIRECT,
    # page cache dropped, the second pass counted.
    index = json.loads((a.dir / "model.safetensors.index.json").read_text())
    shards = sorted({a.dir / f for f in index["weight_map"].values()})[1:-2]
    drop_caches()
    read_bandwidth(shards, 4, a.bw_bytes)
    drop_caches()
    again = read_bandwidth(shards, 4, a.bw_bytes)
    again["readers"] = "4 (re-read)"
    bw.append(again)
    print(f"disk, the same {fmt_b(again['bytes'])} read a second time: {again['gb_s']:.2f} GB/s", flush=True)
    best = max(r["gb_s"] for r in bw) * 1e9
    report(a, results, bw, best, preps)
    return 0


def report(a, results, bw, best, preps) -> None:
    by = {r["key"]: r for r in results}

    def limit_of(r):
        return r["bytes_per_sweep"] / best if r.get("bytes_per_sweep") is not None else None

    lim16 = limit_of(by["ls"]) if "ls" in by and by["ls"].get("decode_s") else None
    limdef = limit_of(by["lsdef"]) if "lsdef" in by and by["lsdef"].get("decode_s") else None
    print(f"\n{a.layers}-layer Llama-shaped bf16 model ({fmt_b(checkpoint_complete(a.dir)['bytes'])}), CPU, greedy, "
          f"{a.new_tokens} new tokens; best disk bandwidth {best / 1e9:.2f} GB/s")
    if lim16:
        print(f"limit at max_ram={fmt_b(a.budget)}: {fmt_b(by['ls']['bytes_per_sweep'])} streamed per token / "
              f"{best / 1e9:.2f} GB/s = {lim16:.2f} s/token")
    if limdef:
        print(f"limit at the default budget ({fmt_b(by['lsdef'].get('ram_budget'))}): "
              f"{fmt_b(by['lsdef']['bytes_per_sweep'])} / {best / 1e9:.2f} GB/s = {limdef:.2f} s/token")
    print()
    hdr = (f"{'system':<30} {'setup s':>8} {'1st tok s':>9} {'s/token':>8} {'x limit':>8} {'peak RSS':>10} "
           f"{'RSS-base':>10} {'read/token':>11} {'others':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        if not r.get("decode_s"):
            print(f"{r['name']:<30} failed / not run")
            continue
        lim = limdef if r["key"] == "lsdef" else lim16
        f = lambda x, spec: format(x, spec) if x is not None else "-"  # noqa: E731
        xlim = f"{r['decode_s'] / lim:.2f}x" if lim else "-"
        print(f"{r['name']:<30} {f(r.get('setup_s'), '8.1f')} {f(r.get('first_s'), '9.1f')} {r['decode_s']:>8.2f} "
              f"{xlim:>8} "
              f"{fmt_b(r.get('peak_rss')):>10} {fmt_b(r['peak_rss'] - r['base_rss']):>10} "
              f"{fmt_b(r.get('read_per_token')):>11} {f(r.get('others'), '7.2f')}")
    print("(x limit: s/token over the limit of the same budget (peers: the max_ram budget); RSS-base: peak RSS "
          "minus the process's RSS after imports; others: cores busy with other processes on average, > 0.2 "
          "disturbs the figures)")

    # same tokens
    ref = next((r for r in results if r.get("tokens") is not None and r["key"] in ("ls", "lsdef")), None)
    if ref is not None:
        print()
        for r in results:
            if r.get("tokens") is None or r is ref:
                continue
            same = r["tokens"] == ref["tokens"]
            extra = "" if same or r["key"] != "llama" else " (llama.cpp computes differently; may differ)"
            print(f"tokens {r['name']} vs {ref['name']}: {'same' if same else 'DIFFER'}{extra}"
                  + ("" if same else f" {r['tokens']} vs {ref['tokens']}"))

    def speedup(x, y):
        rx, ry = by.get(x), by.get(y)
        if not rx or not ry or not rx.get("decode_s") or not ry.get("decode_s"):
            return None
        return ry["decode_s"] / rx["decode_s"]

    print()
    for x in ("ls", "lsdef"):
        if x in by and by[x].get("decode_s"):
            parts = [f"{speedup(x, y):.2f}x {by[y]['name']}" for y in ("offload", "airllm", "llama")
                     if speedup(x, y)]
            if parts:
                print(f"{by[x]['name']} decode is " + ", ".join(parts))
    print()
    targets = []
    if lim16:
        v = by["ls"]["decode_s"] / lim16
        targets.append((f"{by['ls']['name']} decode <= 1.15x its limit", v, v <= 1.15, f"{v:.2f}x"))
    if limdef:
        v = by["lsdef"]["decode_s"] / limdef
        targets.append((f"{by['lsdef']['name']} decode <= 1.15x its limit", v, v <= 1.15, f"{v:.2f}x"))
    for x, y, goal in (("ls", "offload", 1.3), ("ls", "llama", 1.7), ("ls", "airllm", 2.0),
                       ("lsdef", "llama", 2.0), ("lsdef", "airllm", 3.0)):
        v = speedup(x, y)
        nx, ny = SYSTEMS[x].replace("BUDGET", fmt_b(a.budget).replace(" ", "")), SYSTEMS[y]
        targets.append((f"{nx} >= {goal}x faster than {ny}", v, v is not None and v >= goal,
                        f"{v:.2f}x" if v else "not measured"))
    for x in ("ls", "lsdef"):
        r = by.get(x)
        if r and r.get("peak_rss"):
            budget = a.budget if x == "ls" else r.get("ram_budget")
            if budget is None:
                continue
            ok = r["peak_rss"] <= budget + 300e6
            targets.append((f"{r['name']} peak RSS <= budget {fmt_b(budget)} + 300 MB", None, ok,
                            f"{fmt_b(r['peak_rss'])} ({fmt_b(r['peak_rss'] - r['base_rss'])} above the "
                            f"{fmt_b(r['base_rss'])} after imports)"))
    for text, _, ok, shown in targets:
        print(f"target {text}: {shown}, {'met' if ok else 'MISSED'}" if shown != "not measured"
              else f"target {text}: not measured")
    print()
    for r in bw:
        print(f"- disk: {r['readers']} reader(s) {r['gb_s']:.2f} GB/s over {fmt_b(r['bytes'])}")
    for r in results:
        print(f"- {r['name']}: {r.get('note')}; per-token s {r.get('token_s')}; prefill read "
              f"{fmt_b(r.get('read_prefill'))}; wall with setup {r.get('wall_s', 0):.0f} s")
        if r.get("plan"):
            print("    " + r["plan"].replace("\n", "\n    "))
    if not all(r.get("cache_dropped", True) for r in results):
        print("WARNING: the page cache could not be dropped (not root?): figures include cached reads")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"results": results, "bandwidth": bw, "best_bandwidth": best,
                                      "limit_s": lim16, "limit_default_s": limdef, "prep": preps,
                                      "targets": [{"target": t, "value": v, "met": ok} for t, v, ok, _ in targets],
                                      "args": {k: str(v) for k, v in vars(a).items()}}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
