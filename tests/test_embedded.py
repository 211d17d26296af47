"""The real embedded model (SmolLM2-135M-Instruct from its GGUF) against transformers itself."""

import subprocess
import sys

import pytest
import torch

from layerstream import AutoModel, ChatSession

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
