"""The real embedded model (SmolLM2-135M-Instruct from its GGUF) against transformers itself."""

import json
import subprocess
import sys

import pytest
import torch

from layerstream import AutoModel, ChatSession
from layerstream.errors import InputError

from conftest import ROOT

# every test here runs the 135M-parameter model (or splits its GGUF into 538 MB of floats): tens of seconds each
pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Write a short poem about the sea."}]


def chat_ids(tok, messages=PROMPT):
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return enc["input_ids"]


@pytest.fixture(scope="module")
def want(smol_reference, embedded_store):
    m = AutoModel.from_pretrained(embedded_store, max_ram=0, progress=False)
    ids = chat_ids(m.tokenizer)
    with torch.no_grad():
        logits = smol_reference(ids).logits
    tokens = smol_reference.generate(ids, max_new_tokens=24, do_sample=False)
    return ids, logits, tokens


@pytest.mark.parametrize("kernels", [False, None])
@pytest.mark.parametrize("budget", [0, "200MB", None])
def test_smollm2_matches_transformers(embedded_store, want, budget, kernels):
    """Streamed, partly or fully resident: on the dequantize path (kernels=False) the logits are transformers'
    within 1e-4; computing on the blocks with ggml (the default), within its 8-bit rounding of the activations,
    the same top token wherever transformers' top two are not near-tied; on both, the same 24 greedy tokens."""
    from test_gguf import assert_near_ties_only

    ids, logits, tokens = want
    m = AutoModel.from_pretrained(embedded_store, max_ram=budget, progress=False, kernels=kernels)
    if kernels is False:
        torch.testing.assert_close(m(ids).logits, logits, rtol=1e-4, atol=2e-4)
    else:
        assert_near_ties_only(m(ids).logits, logits)
    out = m.generate(ids, max_new_tokens=24, do_sample=False)
    assert out.tolist() == tokens.tolist()
    text = m.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(text.split()) >= 10
    if budget == 0:   # every layer read each sweep; the tied embedding read once, for the head
        per_sweep = sum(u.bytes for u in m.store.manifest.units)
        assert abs(m.last_stats["bytes_per_token"] - per_sweep) / per_sweep < 0.01
    if budget is None:
        assert m.last_stats["bytes_read"] == 0
    m.close()


def test_embedded_default_source_and_store_reuse(embedded_store, capfd):
    """source=None is the embedded GGUF, served in place: the store holds no weights (a manifest, the config
    and the tokenizer: a few MB against the file's 97 MB of blocks). Opening it again reuses that store: nothing
    is indexed or written again (every file of the store keeps its mtime, no file is added)."""
    from layerstream.sources import embedded_model

    def files():
        return {f.relative_to(embedded_store): f.stat().st_mtime_ns for f in embedded_store.rglob("*") if f.is_file()}

    before = files()
    assert not any(str(f).startswith("units") for f in before)
    extra = sum((embedded_store / f).stat().st_size for f in before)
    assert extra < 0.05 * embedded_model().stat().st_size, extra
    capfd.readouterr()
    m = AutoModel.from_pretrained(None, store_path=embedded_store, max_ram=0, progress=False)
    err = capfd.readouterr().err
    assert f"using store {embedded_store}" in err, err
    assert m.store.path == embedded_store
    assert files() == before
    assert m.store.manifest.source["kind"] == "gguf" and m.store.manifest.in_place
    assert m.store.manifest.quantization == "gguf"
    assert {t.rsplit(".", 1)[-1] for u in m.store.manifest.units for t in u.tensors} >= {"q4_1", "q8_0"}
    assert m.store.manifest.architecture == "LlamaForCausalLM"
    assert m.store.manifest.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    m.close()


def test_chat_keeps_the_kv_cache_between_turns(embedded_store, smol_reference):
    m = AutoModel.from_pretrained(embedded_store, max_ram=0, progress=False)
    chat = ChatSession(m)
    first = chat.send("What is the capital of France?", max_new_tokens=12, do_sample=False)
    sweeps_tokens = []
    hook = m.model.get_input_embeddings().register_forward_pre_hook(
        lambda mod, args: sweeps_tokens.append(args[0].shape[-1]))
    second = chat.send("And of Italy?", max_new_tokens=12, do_sample=False)
    hook.remove()
    full = chat_ids(m.tokenizer, chat.messages[:-1])
    # the second turn's first sweep computed only the new tokens, not the history
    assert sweeps_tokens[0] == chat.last_prefill
    assert chat.last_prefill < full.shape[1] // 2
    # and it answered exactly what a fresh full prefill answers
    ref = smol_reference.generate(full, max_new_tokens=12, do_sample=False)
    assert m.tokenizer.decode(ref[0, full.shape[1]:], skip_special_tokens=True) == second
    assert first and second


def test_split_of_gguf_reads_tensor_by_tensor(tmp_path):
    """Splitting needs about one unit of RAM, not the whole model."""
    code = (f"import sys, resource; sys.path.insert(0, {str(ROOT)!r});"
            "import torch, transformers, gguf, layerstream.store as s, layerstream.sources as src;"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            f"out = s.split(src.embedded_model(), {str(tmp_path / 'store')!r}, progress=False);"
            "print(base * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    base, peak = map(int, r.stdout.split())
    total = sum(f.stat().st_size for f in (tmp_path / "store" / "units").iterdir())
    largest = max(f.stat().st_size for f in (tmp_path / "store" / "units").iterdir())
    assert total > 500e6
    # the tokenizer and config parsing cost some too; the whole model (538 MB) must not be held
    assert peak - base < largest * 3 + 150e6, (peak - base, largest)


def test_a_constrained_row_beside_free_ones(embedded_store):
    """A request held to a JSON schema gives JSON of that schema, and the rows beside it in the same sweeps get the
    tokens they get alone (the mask is the constrained row's only)."""
    from layerstream.engine.constrain import json_schema
    from layerstream.engine.scheduler import Engine, SamplingParams

    m = AutoModel.from_pretrained(embedded_store, progress=False)
    tok = m.tokenizer
    ask = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
           for q in ("Describe a dog as JSON.", "Write a haiku about rain.")]
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                               "legs": {"type": "integer"}},
              "required": ["name", "legs"], "additionalProperties": False}
    alone = Engine(m).generate([ask[1]], SamplingParams(max_tokens=12))[0].token_ids
    out = Engine(m, max_batch=2).generate(ask, [SamplingParams(max_tokens=40, grammar=json_schema(schema)),
                                                SamplingParams(max_tokens=12)])
    obj = json.loads(out[0].text)
    assert out[0].finish_reason == "stop" and set(obj) == {"name", "legs"} and isinstance(obj["legs"], int)
    assert out[1].token_ids == alone
    with pytest.raises(InputError, match="cannot be used"):
        Engine(m).submit(ask[0], SamplingParams(grammar=json_schema({"type": "nonsense"})))


def test_a_batch_line_takes_a_response_format(embedded_store, tmp_path):
    """Batch jobs take response_format per line, as the server does: the line's text is JSON of its schema."""
    from layerstream.engine.batch import run_batch

    schema = {"type": "object", "properties": {"animal": {"type": "string", "maxLength": 12},
                                               "legs": {"type": "integer", "minimum": 0, "maximum": 100}},
              "required": ["animal", "legs"], "additionalProperties": False}
    lines = [{"custom_id": "j", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": "Name an animal."}], "max_tokens": 40,
                       "temperature": 0, "response_format": {"type": "json_schema",
                                                             "json_schema": {"name": "a", "schema": schema}}}},
             {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    m = AutoModel.from_pretrained(embedded_store, progress=False)
    run_batch(m, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False)
    good, bad = (json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines())
    obj = json.loads(good["response"]["body"]["choices"][0]["message"]["content"])
    assert set(obj) == {"animal", "legs"} and 0 <= obj["legs"] <= 100
    assert bad["response"]["status_code"] == 400 and bad["error"]["code"] == "invalid_value"


def test_a_constrained_greedy_row_is_drafted_under_its_grammar(embedded_store, tmp_path):
    """Speculative decoding with a grammar: drafts are drafted under the row's mask and verified against the
    model's masked greedy tokens, so the tokens are exactly those of the row decoded without a draft, both with a
    draft that agrees (the same model: every draft accepted) and with one that mostly does not (random weights of
    the same vocabulary: drafts rejected, the grammar rolled back)."""
    from layerstream.engine.constrain import json_schema
    from layerstream.engine.scheduler import Engine, SamplingParams

    from conftest import make_tiny_dir, tiny_config

    m = AutoModel.from_pretrained(embedded_store, progress=False)
    tok = m.tokenizer
    ask = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
           for q in ("Describe a cat as JSON.", "Describe a bird as JSON.")]
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                               "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
              "required": ["name", "legs"], "additionalProperties": False}
    params = SamplingParams(max_tokens=40, grammar=json_schema(schema))
    want = [c.token_ids for c in Engine(m, max_batch=2).generate(ask, params)]
    assert all(json.loads(tok.decode(w, skip_special_tokens=True)) for w in want)
    cfg = tiny_config("llama", layers=2)
    cfg.vocab_size = m.config.vocab_size
    random = AutoModel.from_pretrained(make_tiny_dir(tmp_path / "draft", cfg), store_path=tmp_path / "ds",
                                       progress=False)
    for draft in (AutoModel.from_pretrained(embedded_store, progress=False), random):
        eng = Engine(m, max_batch=2, draft=draft)
        assert [c.token_ids for c in eng.generate(ask, params)] == want
        s = eng.stats
        assert s["drafted"] > 0 and s["steps"] < s["tokens"]   # several tokens a sweep: the accepted drafts
        if draft is random:
            assert s["accepted"] < s["drafted"]
        else:
            assert s["accepted"] > s["drafted"] // 2
        draft.close()
