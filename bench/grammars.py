"""The grammar engines for constrained decoding, side by side (issue 22): llguidance (what layerstream uses,
engine/constrain.py), xgrammar and outlines-core, on the embedded SmolLM2's vocabulary (49,152 tokens).

For each engine and schema: the one-time cost of its view of the tokenizer, the schema's compile time, and the
cost of one decode step for one constrained row, which is filling the row's allowed-token bitmask and advancing
the matcher by the chosen token (applying the bitmask to the logits is one torch op, the same for all three,
and left out), over the tokens of a valid answer, repeated. Each engine runs in this process, one after another.

    .venv/bin/pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi outlines-core==0.2.14   # the peers, not deps
    .venv/bin/python bench/grammars.py [--repeat 30]
"""

import argparse
import json
import statistics
import time

import torch

CITY = {"type": "object", "additionalProperties": False, "required": ["name", "country", "population"],
        "properties": {"name": {"type": "string", "maxLength": 24}, "country": {"type": "string", "maxLength": 24},
                       "population": {"type": "integer", "minimum": 0, "maximum": 100_000_000}}}
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
CLOCK = {"type": "object", "additionalProperties": False, "required": ["timezone"],
         "properties": {"timezone": {"type": "string", "maxLength": 24}}}
# the shape of a required tool call over two functions (layerstream/tools.py), written as one JSON object
CALL = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                   "properties": {"name": {"const": n}, "arguments": s}} for n, s in (("get_weather", WEATHER),
                                                                                     ("get_time", CLOCK))]}
CASES = {"city": (CITY, {"name": "Paris", "country": "France", "population": 2148000}),
         "tool call": (CALL, {"name": "get_weather", "arguments": {"city": "Lima", "unit": "celsius"}})}


def timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


class Llguidance:
    name = "llguidance"

    def __init__(self, tok):
        import llguidance
        import llguidance.hf
        import llguidance.torch as lt

        self.ll, self.lt = llguidance, lt
        self.tok = llguidance.hf.from_tokenizer(tok)
        self.bits = lt.allocate_token_bitmask(1, self.tok.vocab_size)

    def compile(self, schema):
        from layerstream.engine.constrain import COMPACT

        return self.ll.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT)

    def matcher(self, grammar):
        m = self.ll.LLMatcher(self.tok, grammar)
        assert not m.is_error(), m.get_error()
        return m

    def step(self, m, token):
        self.lt.fill_next_token_bitmask(m, self.bits, 0)
        assert m.consume_token(token), m.get_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.bits = xgr.allocate_token_bitmask(1, info.vocab_size)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))

    def matcher(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def step(self, m, token):
        m.fill_next_token_bitmask(self.bits)
        assert m.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok):
        import outlines_core as oc
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.oc = oc
        byte = {c: b for b, c in bytes_to_unicode().items()}   # byte-level BPE token text -> its bytes
        special = set(tok.all_special_ids)
        words: dict[bytes, list[int]] = {}
        for text, i in tok.get_vocab().items():
            if i not in special:
                words.setdefault(bytes(byte[c] for c in text), []).append(i)
        self.vocab = oc.Vocabulary(tok.eos_token_id, words)
        self.bits = torch.zeros(1, (len(tok) + 31) // 32, dtype=torch.int32)

    def compile(self, schema):
        from outlines_core.json_schema import build_regex_from_schema

        return self.oc.Index(build_regex_from_schema(json.dumps(schema)), self.vocab)

    def matcher(self, index):
        return self.oc.Guide(index)

    def step(self, g, token):
        g.write_mask_into(self.bits.data_ptr(), self.bits.numel(), self.bits.element_size())
        g.advance(token)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=30)
    a = p.parse_args()
    torch.set_num_threads(1)
    from layerstream.api import AutoModel

    tok = AutoModel.from_pretrained(None, progress=False).tokenizer
    print(f"vocabulary: {len(tok)} tokens; {a.repeat} passes over each answer; step = fill the bitmask + advance")
    print("| engine | tokenizer view (s) | schema | first request: compile + matcher + its steps (ms) "
          "| later steps: mean (µs) | median (µs) | p90 (µs) | tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for cls in (Llguidance, Xgrammar, OutlinesCore):
        try:
            eng, t_view = timed(lambda: cls(tok))
        except ImportError as e:
            print(f"| {cls.name} | not installed ({e.name}) | | | | | | |")
            continue
        for case, (schema, answer) in CASES.items():
            ids = tok(json.dumps(answer), add_special_tokens=False)["input_ids"]
            t0 = time.perf_counter()
            grammar = eng.compile(schema)   # (llguidance compiles lazily, in its matcher and first steps)
            m = eng.matcher(grammar)
            for t in ids:
                eng.step(m, t)
            first = time.perf_counter() - t0
            steps = []
            for _ in range(a.repeat):
                m = eng.matcher(grammar)
                for t in ids:
                    t0 = time.perf_counter()
                    eng.step(m, t)
                    steps.append(time.perf_counter() - t0)
            steps.sort()
            print(f"| {cls.name} | {t_view:.2f} | {case} | {first * 1e3:.1f} | {statistics.mean(steps) * 1e6:.1f} | "
                  f"{statistics.median(steps) * 1e6:.1f} | {steps[int(len(steps) * 0.9)] * 1e6:.1f} | {len(ids)} |",
                  flush=True)


if __name__ == "__main__":
    main()
