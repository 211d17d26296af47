"""Speculative decoding on the streamed embedded model: int4 self-draft and prompt lookup vs plain decoding.

The embedded SmolLM2-135M-Instruct, float32, streamed (`max_ram=0`: every layer read every sweep; nothing
resident but the draft). Plain: one sweep per token. int4 self-draft (`draft="int4"`): a resident int4 copy
computed in bfloat16 on its packed blocks proposes tokens, one streamed sweep verifies them. Prompt lookup
(`prompt_lookup_num_tokens`): tokens copied from the prompt, on a prompt that asks to repeat a passage with
small edits. Each system in its own process; greedy tokens must be identical to plain decoding's.

    .venv/bin/python bench/speculative.py [--tokens 64]
"""

from __future__ import annotations

import sys

from harness import emit, fmt, parser, ratio, run_child, self_cmd, table, timed_generate

CHATS = ["Write a short poem about the sea.", "Explain photosynthesis in two sentences.",
         "What are three tips for staying focused while studying?", "Describe a sunset to someone who cannot see.",
         "Give me a recipe for a simple tomato soup.", "Why is the sky blue?",
         "Write a haiku about autumn leaves.", "What is the difference between a virus and a bacterium?"]
PASSAGE = ("The old lighthouse stood on the northern cliff for two hundred years. Every night its keeper climbed "
           "the spiral stairs, trimmed the wick and watched the ships pass safely through the narrow strait.")
LOOKUP = (f"Repeat the following passage exactly, but replace 'northern' with 'southern' and 'two hundred' "
          f"with 'three hundred':\n\n{PASSAGE}")


def child(mode: str, tokens: int) -> None:
    from layerstream import AutoModel

    m = AutoModel.from_pretrained(None, max_ram=0, progress=False, draft="int4" if mode == "int4" else None)
    tok = m.tokenizer
    prompts = [LOOKUP] if mode.startswith("lookup") else CHATS
    extra = {"prompt_lookup_num_tokens": 10} if mode == "lookup" else {}
    out = []
    for text in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt")["input_ids"]
        new, dt = timed_generate(m, ids, tokens, **extra)   # after a 2-token warm-up
        s = m.last_stats
        out.append({"tokens": new, "seconds": dt, "sweeps": s["sweeps"], "drafted": s.get("drafted", 0),
                    "accepted": s.get("accepted", 0)})
    emit({"runs": out})


def main() -> None:
    p = parser(__doc__, wait_quiet=120)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--child", default=None)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.tokens)
    res = {}
    for mode in ("plain", "int4", "lookup-plain", "lookup"):
        c = run_child(self_cmd(__file__, "--child", mode, "--tokens", a.tokens), wait_quiet=a.wait_quiet)
        if c.result is None:
            sys.exit(f"{mode} failed: {c.note}")
        res[mode] = c.result["runs"]
        print(f"{mode}: done in {c.wall:.0f} s (other load {fmt(c.others)} cores)", file=sys.stderr)
    rows = []
    for name, mode, base in (("int4 self-draft, 8 chat prompts", "int4", "plain"),
                             ("prompt lookup, repeat with edits", "lookup", "lookup-plain")):
        runs, plain = res[mode], res[base]
        new = sum(len(r["tokens"]) for r in runs)
        same = sum(r["tokens"] == q["tokens"] for r, q in zip(runs, plain))
        t_plain = sum(q["seconds"] for q in plain) / sum(len(q["tokens"]) for q in plain)
        t = sum(r["seconds"] for r in runs) / new
        rows.append([name, f"{same}/{len(runs)}", sum(q["sweeps"] for q in plain), sum(r["sweeps"] for r in runs),
                     fmt(new / sum(r["sweeps"] for r in runs)),
                     f"{sum(r['accepted'] for r in runs)}/{sum(r['drafted'] for r in runs)}",
                     fmt(1 / t_plain), fmt(1 / t), ratio(t_plain, t)])
    table(["streamed SmolLM2 (max_ram=0)", "same tokens", "plain sweeps", "sweeps", "tokens/sweep",
           "accepted/drafted", "plain tok/s", "tok/s", "speed-up"], rows)


if __name__ == "__main__":
    main()
