"""FP8 checkpoints (float8 e4m3 weights with block scales, as DeepSeek-V3 and Qwen publish them)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from layerstream import AutoModel

from conftest import make_model_dir

BLOCK = (32, 32)


def to_fp8(w: torch.Tensor):
    """Block-wise e4m3 with float32 inverse scales, the layout of DeepSeek-V3's checkpoints."""
    rows, cols = w.shape
    r, c = -(-rows // BLOCK[0]), -(-cols // BLOCK[1])
    scale = torch.zeros(r, c)
    q = torch.empty_like(w, dtype=torch.float8_e4m3fn)
    for i in range(r):
        for j in range(c):
            blk = w[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]].float()
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def dequant(q, scale):
    full = scale.repeat_interleave(BLOCK[0], 0)[:q.shape[0]].repeat_interleave(BLOCK[1], 1)[:, :q.shape[1]]
    return q.float() * full


@pytest.mark.parametrize("max_ram", [0, None])
def test_fp8_checkpoint_runs_as_its_dequantized_weights(tmp_path, max_ram):
    src = make_model_dir(tmp_path / "float", "qwen3", tie=False, dtype=torch.bfloat16)
    tensors = load_file(src / "model.safetensors")
    fp8, reference = {}, {}
    for name, t in tensors.items():
        if t.dim() == 2 and "embed_tokens" not in name:
            q, s = to_fp8(t)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            reference[name] = dequant(q, s).to(torch.bfloat16)
        else:
            fp8[name] = reference[name] = t
    out = tmp_path / "fp8"
    out.mkdir()
    save_file(fp8, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(BLOCK),
                                  "activation_scheme": "dynamic"}
    (out / "config.json").write_text(json.dumps(cfg))
    # the reference: transformers on the dequantized weights
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    save_file(reference, ref_dir / "model.safetensors", metadata={"format": "pt"})
    (ref_dir / "config.json").write_text((src / "config.json").read_text())
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.bfloat16).eval()

    m = AutoModel.from_pretrained(out, max_ram=max_ram, store_path=tmp_path / "store", progress=False)
    assert not m.store.manifest.in_place and m.store.manifest.dtype == "bfloat16"
    assert "quantization_config" not in json.loads((tmp_path / "store" / "config.json").read_text())
    ids = torch.tensor([[1, 7, 3, 99, 45]])
    with torch.no_grad():
        want = ref(ids).logits
    torch.testing.assert_close(m(ids).logits, want, rtol=0, atol=0)
    assert m.generate(ids, max_new_tokens=10, do_sample=False).tolist() == \
        ref.generate(ids, max_new_tokens=10, do_sample=False).tolist()


def test_other_quantized_checkpoints_are_refused_clearly(tmp_path):
    from layerstream.errors import SourceError
    from layerstream.store import resolve

    src = make_model_dir(tmp_path / "gptq", "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="'gptq' are not supported"):
        resolve(src, store_path=tmp_path / "store", progress=False)
