"""Spike (issue 21): which families run on the paged prototype (layerstream/engine/paged.py).

For each tested family, a tiny random model (tests/families_tiny.py + tests/factory.py) in transformers directly:
2 prompts of 5 and 11 tokens (sliding windows are 8 there), 8 greedy tokens each, in one forward per step,
against transformers' generate of each prompt alone; on PagedRunner (transformers' PagedAttentionCache +
per-sequence SDPA) and SlabRunner. Prints one line per family: ok / differs / the error.
Run: PYTHONPATH=.:tests python bench/paged_families.py [families...]"""

import signal
import sys
from contextlib import nullcontext

import torch

from layerstream.arch import TESTED_MODEL_TYPES
from layerstream.engine import paged

from factory import tiny_model
from families_tiny import SINGLE_TOKEN_WITH_CONFTEST_SPREAD, tiny_family_config


class Shim:
    def __init__(self, net):
        self.model, self.config, self.device, self.dtype = net, net.config, net.device, net.dtype

    def running(self):
        return nullcontext()


def alarm(*_):
    raise TimeoutError("over 60 s")


def one(mt):
    untie = mt in ("biogpt", "gemma3_text", "gemma3n_text", "gemma4_text", "gemma4_unified_text", "openai-gpt", "xglm")
    cfg = tiny_family_config(mt, tie=False if untie else None)
    net = tiny_model(cfg, seed=1 if mt == "gemma4_text" else 0,
                     normal_biases=mt in SINGLE_TOKEN_WITH_CONFTEST_SPREAD).eval()
    impl0 = net.config._attn_implementation
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 120, (n,), generator=g).tolist() for n in (5, 11)]
    with torch.no_grad():
        want = [net.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    out = []
    for name, make in (("paged", lambda: paged.PagedRunner(Shim(net), num_blocks=16, page_size=4)),
                       ("slab", lambda: paged.SlabRunner(Shim(net), chunk=4))):
        try:
            got = paged.generate(make(), prompts, 8)
            out.append(f"{name}: " + ("ok" if got == want else f"differs {got} vs {want}"))
        except Exception as e:
            out.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}")
        finally:
            net.config._attn_implementation_internal = impl0
            try:
                net.set_attn_implementation(impl0)
            except Exception:
                pass
    return f"(attn {impl0}) " + " | ".join(out)


def main():
    fams = sys.argv[1:] or list(TESTED_MODEL_TYPES)
    signal.signal(signal.SIGALRM, alarm)
    for mt in fams:
        signal.alarm(60)
        try:
            line = one(mt)
        except Exception as e:
            line = f"setup: {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
        signal.alarm(0)
        print(f"{mt}: {line}", flush=True)


if __name__ == "__main__":
    main()
