import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from factory import make_tiny_dir  # the one tiny-model factory (tests/factory.py)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the stores the tests make go to a cache of their own (inherited by the CLI subprocesses), removed at the end:
# nothing is left in the user's cache
CACHE = tempfile.mkdtemp(prefix="layerstream-tests-")
os.environ["LAYERSTREAM_CACHE"] = CACHE

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """The suite's markers (registered here, not in pyproject.toml). `pytest -m "not slow"` is the fast
    subset; `-m "not gpu"` leaves out the accelerator tests (they skip themselves where torch sees no GPU)."""
    config.addinivalue_line("markers", "slow: takes more than 10 s on a 2-core CPU machine (deselect with "
                                       "-m 'not slow')")
    config.addinivalue_line("markers", "gpu: needs a CUDA/ROCm device (skipped where torch sees none)")


def pytest_unconfigure(config):
    shutil.rmtree(CACHE, ignore_errors=True)


def tiny_config(family: str, tie: bool | None = None, layers: int = 3):
    """A small random-weight config of a transformers family."""
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
           "gemma2": tf.Gemma2Config, "phi3": tf.Phi3Config}[family]
    extra = {"gemma2": dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16),
             "qwen3": dict(head_dim=16), "mistral": dict(sliding_window=None),
             "phi3": dict(num_key_value_heads=4)}.get(family, {})
    cfg = cls(**{**common, **extra})
    if tie is not None:
        cfg.tie_word_embeddings = tie
    return cfg


def make_model_dir(path: Path, family: str, tie: bool | None = None, layers: int = 3, dtype=torch.float32,
                   shard: str | None = None, seed: int = 0) -> Path:
    """Write a random-weight transformers checkpoint (safetensors) to `path` and return it."""
    return make_tiny_dir(path, tiny_config(family, tie, layers), seed=seed, dtype=dtype, shard=shard)


@pytest.fixture(scope="session")
def embedded_store(tmp_path_factory):
    """The embedded SmolLM2 model split once for the whole session."""
    from layerstream.store import resolve

    return resolve(None, store_path=tmp_path_factory.mktemp("smol") / "store", progress=False)


@pytest.fixture(scope="session")
def smol_reference():
    """transformers' own SmolLM2 loaded from the GGUF, and the tokenizer."""
    from transformers import AutoModelForCausalLM

    from layerstream.sources import embedded_model

    g = embedded_model()
    return AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()


def run_cli(*args, env=None, input=None, timeout=600):
    e = dict(os.environ)
    e.update(env or {})
    # no input: stdin is /dev/null, as at an empty terminal (run reads a piped prompt)
    return subprocess.run([sys.executable, "-m", "layerstream", *map(str, args)], capture_output=True, text=True,
                          env=e, input=input, timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)


def tiny_moe_config(family: str, layers: int = 3):
    """A small random-weight mixture-of-experts config (8 experts, 2 per token)."""
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, num_experts_per_tok=2)
    deepseek = dict(num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                    first_k_dense_replace=1, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    return {
        "mixtral": lambda: tf.MixtralConfig(**common, num_local_experts=8),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**common, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                               num_experts=8),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=8, head_dim=16),
        "deepseek_v2": lambda: tf.DeepseekV2Config(**{**common, **deepseek}, q_lora_rank=None),
        "deepseek_v3": lambda: tf.DeepseekV3Config(**{**common, **deepseek}, q_lora_rank=32, n_group=2, topk_group=1),
    }[family]()


def make_moe_dir(path: Path, family: str, layers: int = 3, fused: bool = False, seed: int = 0) -> Path:
    """A random-weight MoE checkpoint. As transformers saves it (one tensor per expert and weight, the
    hub's layout), or with `fused` as the model holds it ([num_experts, ...] per weight). A router bias
    kept in the checkpoint (DeepSeek-V3's) is random too."""
    return make_tiny_dir(path, tiny_moe_config(family, layers), seed=seed, router_bias=True, fused=fused)


def reference(path):
    """transformers' own model from a checkpoint directory, in float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def assert_like_transformers(m, ref, ids, new_tokens: int):
    """Logits within 1e-4 and greedy tokens identical to transformers' (and a real sequence, not one token
    repeated). Returns transformers' logits."""
    with torch.no_grad():
        want_logits = ref(ids).logits
    torch.testing.assert_close(m(ids).logits, want_logits, rtol=1e-4, atol=1e-4)
    want = ref.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    got = m.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    assert got.tolist() == want.tolist()
    assert len(set(got[0, ids.shape[1]:].tolist())) > 1
    return want_logits


@contextlib.contextmanager
def serving(*args):
    """`layerstream serve --port 0 ARGS` running: yields (its URL, what it printed: "lines" so far); on leaving
    without an error it is stopped with SIGINT ("rest": what it printed then, "code": its exit status)."""
    p, url, lines = start_serve(*args)
    out = {"lines": lines}
    try:
        assert url, "".join(lines)
        yield url, out
        p.send_signal(signal.SIGINT)
        out["rest"] = p.communicate(timeout=60)[1]
        out["code"] = p.returncode
    finally:
        if p.poll() is None:
            p.kill()


def start_serve(*args, timeout: float = 300):
    """`layerstream serve --port 0 ARGS` as a child process, read until it says its URL: (process, URL, the lines
    it printed). The caller stops it (SIGINT) and reads the rest."""
    p = subprocess.Popen([sys.executable, "-m", "layerstream", "serve", "--port", "0", *map(str, args)],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines, url, deadline = [], None, time.time() + timeout
    while time.time() < deadline and url is None:
        line = p.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "serving" in line:
            url = line.split(" at ", 1)[1].split("/v1", 1)[0]
    return p, url, lines


def start(server):
    """A uvicorn server run in a thread: (server, thread, port) once it listens."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(400):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    return server, thread, server.servers[0].sockets[0].getsockname()[1]
