"""LoRA adapters (PEFT's format) on a streamed model: the same logits and greedy tokens as peft's own model on
transformers, whatever is streamed or resident, in place or quantized; bad adapters are refused clearly."""

import json

import pytest
import torch

from layerstream import AutoModel
from layerstream.engine.scheduler import Engine, SamplingParams
from layerstream.errors import InputError

from conftest import assert_like_transformers, make_model_dir, reference, run_cli

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 7, 3, 99, 45, 12, 100, 17]])
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def make_adapter(base, out, seed=1, **config):
    """A PEFT LoRA adapter for the checkpoint at `base`, with random (nonzero) A and B, saved at `out`; returns
    peft's model (transformers + the adapter), the reference."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(reference(base), LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS,
                                                          **config}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    return model.eval()


def smol_adapter(out, seed: int, std: float):
    """A random LoRA adapter (q_proj, v_proj, rank 8) for the embedded SmolLM2, saved at `out`; returns peft's
    model on transformers' own SmolLM2 read from the GGUF (the reference)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from layerstream.sources import embedded_model

    g = embedded_model()
    torch.manual_seed(seed)
    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32),
                         LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)
    ref.save_pretrained(out)
    return ref.eval()


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    base = make_model_dir(d / "base", "llama")
    ref = make_adapter(base, d / "adapter")
    return base, d / "adapter", ref


@pytest.mark.parametrize("max_ram", [None, 0])
def test_adapter_gives_peft_logits_and_tokens(adapted, tmp_path, max_ram):
    base, adapter, ref = adapted
    m = AutoModel.from_pretrained(base, adapter=str(adapter), max_ram=max_ram, store_path=tmp_path / "s",
                                  progress=False)
    try:
        assert m.adapter.rank == 4 and len(m.adapter.modules) == 3 * len(TARGETS)
        assert any("LoRA adapter" in n for n in m.plan.notes)
        want = assert_like_transformers(m, ref, IDS, 8)
        # the adapter changes the output (a test of the hooks, not of a no-op)
        with torch.no_grad():
            plain = reference(base)(IDS).logits
        assert (want - plain).abs().max() > 1e-2
        # the engine's packed rows (two prompts in one sweep) get peft's greedy tokens too
        prompts = [IDS[0].tolist(), [1, 50, 60, 70]]
        got = Engine(m, max_batch=2, prefix_cache=0).generate(prompts, SamplingParams(max_tokens=6))
        for p, c in zip(prompts, got):
            ref_out = ref.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p):].tolist()
            assert c.token_ids == ref_out[:len(c.token_ids)] and (len(c.token_ids) == 6 or c.finish_reason == "stop")
    finally:
        m.close()


def test_rslora_and_rank_pattern_scale_as_peft(tmp_path):
    base = make_model_dir(tmp_path / "base", "llama")
    ref = make_adapter(base, tmp_path / "adapter", use_rslora=True,
                       rank_pattern={"v_proj": 2, r"layers\.2\.mlp\.down_proj": 3},
                       alpha_pattern={"o_proj": 3, r"layers\.1\.self_attn\.q_proj": 5})
    m = AutoModel.from_pretrained(base, adapter=str(tmp_path / "adapter"), max_ram=0, progress=False)
    try:
        assert_like_transformers(m, ref, IDS, 6)
    finally:
        m.close()


def test_one_store_serves_with_and_without_the_adapter(adapted, tmp_path):
    """...and a batch job's journal tells them apart (a rerun with another adapter redoes every request)."""
    from layerstream.engine.journal import fingerprint

    base, adapter, ref = adapted
    store = tmp_path / "s"
    plain = AutoModel.from_pretrained(base, store_path=store, progress=False)
    with_adapter = AutoModel.from_pretrained(store, adapter=str(adapter), progress=False)
    other_dir = tmp_path / "other"
    make_adapter(base, other_dir, seed=2)
    other = AutoModel.from_pretrained(store, adapter=str(other_dir), progress=False)
    try:
        with torch.no_grad():
            torch.testing.assert_close(plain(IDS).logits, reference(base)(IDS).logits, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(with_adapter(IDS).logits, ref(IDS).logits, rtol=1e-4, atol=1e-4)
        prints = [fingerprint(m, "tiny") for m in (plain, with_adapter, other)]
        assert prints[0]["adapter"] is None and len({p["adapter"] for p in prints}) == 3
    finally:
        plain.close()
        with_adapter.close()
        other.close()


@pytest.mark.slow
def test_cli_run_with_an_adapter_gives_peft_text(embedded_store, tmp_path):
    """`layerstream run --adapter` on the embedded model: peft's greedy text from transformers' own model."""
    from transformers import AutoTokenizer

    ref = smol_adapter(tmp_path / "adapter", seed=3, std=0.05)
    tok = AutoTokenizer.from_pretrained(embedded_store)
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt").input_ids
    want = tok.decode(ref.eval().generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:],
                      skip_special_tokens=True)
    r = run_cli("run", prompt, "--raw", "--model", embedded_store, "--adapter", tmp_path / "adapter", "--max-ram",
                "0", "--max-new-tokens", "8", "--greedy")
    assert r.returncode == 0, r.stderr
    assert "LoRA adapter adapter: rank 8, 60 linear layers" in r.stderr
    assert r.stdout.strip() == want.strip()
    plain = run_cli("run", prompt, "--raw", "--model", embedded_store, "--max-new-tokens", "8", "--greedy")
    assert plain.returncode == 0 and plain.stdout.strip() != want.strip()   # the adapter changed the text


def test_bad_adapters_are_refused_clearly(adapted, tmp_path):
    base, adapter, _ = adapted

    def refused(path, words):
        with pytest.raises(InputError, match=words):
            AutoModel.from_pretrained(base, adapter=str(path), store_path=tmp_path / "s", progress=False)

    refused(tmp_path / "nowhere", "not a directory")
    bare = tmp_path / "bare"
    bare.mkdir()
    refused(bare, "no adapter_config.json")
    (bare / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    (bare / "adapter_model.bin").write_bytes(b"pickle")
    refused(bare, "safetensors only")
    dora = tmp_path / "dora"
    dora.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    refused(dora, "use_dora=True is not supported")
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter / "adapter_model.safetensors")

    def variant(name, change):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        save_file({k: v.clone() for k, v in change(dict(weights)).items()}, d / "adapter_model.safetensors")
        return d

    a_key = next(k for k in weights if k.endswith("q_proj.lora_A.weight"))
    refused(variant("wide", lambda w: {**w, a_key: torch.zeros(4, w[a_key].shape[1] * 2)}),
            "do not fit its .* layer: was the adapter trained on another model")
    refused(variant("deeper", lambda w: {**w, a_key.replace("layers.0.", "layers.7."): w[a_key],
                                         a_key.replace("layers.0.", "layers.7.").replace("lora_A", "lora_B"):
                                         w[a_key.replace("lora_A", "lora_B")]}),
            "adapts model.layers.7.self_attn.q_proj, which this model does not have")
    refused(variant("half", lambda w: {k: v for k, v in w.items() if k != a_key}), "not both lora_A and lora_B")


@pytest.mark.slow
def test_an_int4_draft_carries_the_adapter_and_greedy_tokens_stay_peft(adapted, tmp_path):
    base, adapter, ref = adapted
    m = AutoModel.from_pretrained(base, adapter=str(adapter), draft="int4", max_ram=0, store_path=tmp_path / "s",
                                  progress=False)
    try:
        assert m.draft.adapter is not None and m.draft.adapter.modules == m.adapter.modules
        want = ref.generate(IDS, max_new_tokens=8, do_sample=False)
        assert m.generate(IDS, max_new_tokens=8, do_sample=False).tolist() == want.tolist()
        assert m.last_stats["drafted"] > 0
    finally:
        m.close()


def test_requests_choose_their_adapter_within_one_sweep(adapted, tmp_path):
    """Two named adapters and the base model, three requests in one sweep: each gets its own model's greedy
    tokens; a prompt computed under one adapter is not borrowed from the prefix cache by another."""
    base, a1, ref1 = adapted
    a2 = tmp_path / "a2"
    ref2 = make_adapter(base, a2, seed=5)
    plain = reference(base)
    m = AutoModel.from_pretrained(base, lora={"one": str(a1), "two": str(a2)}, store_path=tmp_path / "s",
                                  progress=False)
    try:
        assert m.adapter is None and list(m.lora.adapters) == ["one", "two"]
        prompt = [1, 7, 3, 99, 45, 12, 100, 17, 5, 9, 22]   # longer than the prefix cache's shortest share

        def want(ref, p):
            out = ref.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p):].tolist()
            return out

        eng = Engine(m, max_batch=3)
        got = eng.generate([prompt, prompt, prompt], [SamplingParams(max_tokens=6, adapter=a)
                                                      for a in (None, "one", "two")])
        wants = [want(plain, prompt), want(ref1, prompt), want(ref2, prompt)]
        assert len({tuple(w) for w in wants}) == 3   # three different models
        for c, w in zip(got, wants):
            assert c.token_ids == w[:len(c.token_ids)] and (len(c.token_ids) == 6 or c.finish_reason == "stop")
        assert eng.stats["max_batch_seen"] == 3
        # the same prompt again, one adapter at a time: each may borrow only its own adapter's cached prefix
        longer = prompt + [3, 4]
        for a, ref in (("two", ref2), ("one", ref1), (None, plain)):
            hits = eng.stats["prefix_hit_tokens"]
            c = eng.generate([longer], SamplingParams(max_tokens=6, adapter=a))[0]
            assert eng.stats["prefix_hit_tokens"] > hits   # it borrowed (its own adapter's) prefix
            w = want(ref, longer)
            assert c.token_ids == w[:len(c.token_ids)]
        with pytest.raises(InputError, match="no adapter named 'three'"):
            eng.submit(prompt, SamplingParams(adapter="three"))
    finally:
        m.close()


@pytest.mark.slow
def test_the_server_serves_each_adapter_by_model_name(embedded_store, tmp_path):
    """`model` chooses the adapter: the openai client gets peft's text for each, and /v1/models lists them."""
    import socket
    import threading
    import time

    import openai
    import uvicorn

    from layerstream.server.app import build_app

    refs = {name: smol_adapter(tmp_path / name, seed=seed, std=0.1) for name, seed in (("sea", 3), ("sky", 4))}
    # kernels=False: peft's model computes on floats, and these adapters (std 0.1) leave near-ties in the logits
    m = AutoModel.from_pretrained(embedded_store, lora={n: str(tmp_path / n) for n in refs}, progress=False,
                                  kernels=False)
    tok = m.tokenizer
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt").input_ids
    want = {n: tok.decode(r.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:],
                          skip_special_tokens=True) for n, r in refs.items()}
    want["smol"] = tok.decode(m.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:],
                              skip_special_tokens=True)
    assert len(set(want.values())) == 3
    engine = Engine(m, max_batch=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(engine, "smol"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    engine.start()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [x.id for x in c.models.list().data] == ["smol", "sea", "sky"]
        for name in ("sky", "smol", "sea"):
            r = c.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0)
            assert r.model == name and r.choices[0].text == want[name]
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="sun", prompt=prompt, max_tokens=2)
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop()
        m.close()


def test_a_batch_line_chooses_its_adapter_by_model(tmp_path):
    """`layerstream batch`: a line whose `model` names an adapter runs with it, the others with the base."""
    from layerstream.engine.batch import run_batch

    import test_batch

    src = make_model_dir(tmp_path / "tiny", "llama")
    test_batch.save_char_tokenizer(src)
    ref = make_adapter(src, tmp_path / "a1")
    m = AutoModel.from_pretrained(src, lora={"a1": str(tmp_path / "a1")}, store_path=tmp_path / "s",
                                  progress=False)
    try:
        lines = [test_batch.req("base", prompt="abc", max_tokens=5, temperature=0),
                 test_batch.req("tuned", prompt="abc", max_tokens=5, temperature=0, model="a1")]
        run_batch(m, test_batch.write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl", progress=False)
        out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
        ids = m.tokenizer("abc", return_tensors="pt").input_ids
        for o, r in zip(out, (reference(src), ref)):
            want = m.tokenizer.decode(r.generate(ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1]:],
                                      skip_special_tokens=True)
            assert o["response"]["body"]["choices"][0]["text"] == want
        assert out[1]["response"]["body"]["model"] == "a1"
        assert out[0]["response"]["body"]["choices"][0]["text"] != out[1]["response"]["body"]["choices"][0]["text"]
    finally:
        m.close()
