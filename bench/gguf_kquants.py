"""A K-quant GGUF made by llama.cpp, run by layerstream with its blocks kept, against transformers and llama.cpp.

llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize`, Q4_K_M, requantizing allowed) turns
the embedded SmolLM2-135M-Instruct Q4_1 GGUF into a Q4_K_M file. SmolLM2's 576-wide rows are not a multiple
of the K-quants' 256, so llama.cpp falls back to Q5_0 / Q8_0 for most tensors; the file holds Q4_K, Q6_K,
Q5_0 and Q8_0 blocks. Then, each in its own subprocess:

- transformers (float32, dequantized by gguf-py): the reference logits over a fixed text (teacher forcing)
  and greedy tokens;
- layerstream with no options (the file served in place, its blocks read as they lie) and with
  `compression="int4"` (the file's blocks copied into a store of their own), each fully resident (dequantized
  once at load) and streamed with `max_ram=0` (dequantized per sweep); and a float32 copy (`in_place=False`):
  the largest |logit difference| from transformers over the text, whether the greedy tokens are
  transformers', greedy tokens/s and the disk the store takes beside the file;
- llama.cpp on the same file (its own quantized matmuls, so its tokens may differ), greedy tokens/s.

Greedy decoding: 32 new tokens after a chat prompt, one 2-token warm-up first.

Run:  .venv/bin/pip install ../shared/wheels/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl &&
      .venv/bin/python bench/gguf_kquants.py
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import harness

HERE = pathlib.Path(__file__).resolve().parent
WORK = harness.WORK / "kquants"
FILE = WORK / "SmolLM2-135M-Instruct.Q4_K_M.gguf"
NEW = 32
SETTINGS = {
    "transformers": None,
    "layerstream, no options (the file in place), resident": dict(compression=None, max_ram=None, in_place=None),
    "layerstream, no options (the file in place), max_ram=0": dict(compression=None, max_ram=0, in_place=None),
    "layerstream int4 (blocks kept), resident": dict(compression="int4", max_ram=None, in_place=None),
    "layerstream int4 (blocks kept), max_ram=0": dict(compression="int4", max_ram=0, in_place=None),
    "layerstream float32 store (in_place=False), resident": dict(compression=None, max_ram=None, in_place=False),
    "llama.cpp": None,
}


def make() -> dict:
    import collections
    import ctypes

    import gguf
    import llama_cpp

    from layerstream.sources import embedded_model

    WORK.mkdir(parents=True, exist_ok=True)
    if not FILE.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.allow_requantize = True
        params.nthread = 2
        tmp = FILE.with_suffix(".tmp")
        rc = llama_cpp.llama_model_quantize(str(embedded_model()).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize returned {rc}")
        tmp.rename(FILE)
    types = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(FILE).tensors)
    return {"bytes": FILE.stat().st_size, "types": dict(types)}


def child(name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peers import TEXT, prompt_ids, run_llama_cpp

    tok = AutoTokenizer.from_pretrained(WORK, gguf_file=FILE.name)
    ids = prompt_ids(tok)
    text = tok(TEXT, return_tensors="pt")["input_ids"]
    if name == "llama.cpp":
        r = run_llama_cpp(FILE, ids, NEW)
        note = "its own quantized matmuls; median of 5 timed runs" if r.get("tok_s") else r.get("note", "")
        return {"tok_s": r.get("tok_s"), "tokens": r.get("tokens"), "note": note}
    if name == "transformers":
        m = AutoModelForCausalLM.from_pretrained(WORK, gguf_file=FILE.name, dtype=torch.float32).eval()
        store_bytes = None
    else:
        from layerstream import AutoModel

        s = SETTINGS[name]
        store = WORK / f"store-{s['compression'] or ('float32' if s['in_place'] is False else 'in-place')}"
        m = AutoModel.from_pretrained(FILE, compression=s["compression"], max_ram=s["max_ram"], store_path=store,
                                      in_place=s["in_place"], progress=False)
        store_bytes = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())   # disk beside the file
    with torch.inference_mode():
        logits = m(text).logits.float()
        new, seconds = harness.timed_generate(m, ids, NEW)
    if name == "transformers":
        torch.save(logits, WORK / "ref-logits.pt")
        diff = 0.0
    else:
        diff = float((logits - torch.load(WORK / "ref-logits.pt")).abs().max())
    return {"tok_s": len(new) / seconds, "tokens": new, "max_logit_diff": diff, "store_bytes": store_bytes}


def main() -> int:
    p = harness.parser(__doc__, wait_quiet=60.0)
    p.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    p.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child or a.make:
        harness.emit(child(a.child) if a.child else make())
        return 0
    made = harness.run_child(harness.self_cmd(__file__, "--make"))
    info = made.result
    if info is None:
        print(f"could not make the Q4_K_M file (needs llama-cpp-python): {made.note}")
        return 1
    print(f"{FILE}: {info['bytes'] / 1e6:.1f} MB; tensor types {info['types']}")
    results, rows = {}, []
    for name in SETTINGS:
        c = harness.run_child(harness.self_cmd(__file__, "--child", name), wait_quiet=a.wait_quiet)
        r = results[name] = c.result
        print(f"  {name}: " + (f"{harness.fmt(r.get('tok_s'))} tok/s" if r else f"failed: {c.note}"), flush=True)
        if r is None:
            rows.append([name, "failed", "-", "-", "-"])
            continue
        ref = (results.get("transformers") or {}).get("tokens")
        same = "the reference" if name == "transformers" else \
            ("same as transformers" if r["tokens"] == ref else "differ from transformers")
        rows.append([name, harness.fmt(r.get("tok_s")), harness.fmt_b(r.get("store_bytes")),
                     harness.fmt(r.get("max_logit_diff"), ".6f"), f"{same} {r.get('note', '')}".strip()])
    print()
    harness.table(["setting", "tok/s", "store on disk (beside the .gguf)", "max |logit diff|", "tokens"], rows)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "gguf_kquants.json").write_text(json.dumps({"file": info, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
