"""Ray Data: completions for a column of prompts or chat messages, as a callable class for `map_batches`.

    import ray
    from layerstream.ray import Completions

    ds = ray.data.from_items([{"prompt": "The capital of France is"}, ...])
    ds = ds.map_batches(Completions, fn_constructor_kwargs={"model": "/models/big", "max_tokens": 64,
                                                            "max_ram": "16GB"},
                        concurrency=2, batch_size=16, num_cpus=1)

Each of the `concurrency` actors opens the model once; each batch of rows shares the engine's sweeps.
"""

from __future__ import annotations

from ..errors import InputError


class Completions:
    """Adds `completion` (text), `prompt_tokens`, `completion_tokens` and `finish_reason` to a batch whose
    column `prompt` (text) or `messages` (a chat: a list of {role, content}, through the chat template) says
    what to complete. Sampling is the same for every row: `max_tokens`, `temperature` (0: greedy, the tokens of
    `generate`), `top_p`, `seed`, `stop`. `model`: any source `AutoModel.from_pretrained` opens (a path every
    node sees); other keywords are its options (`max_ram`, `device`, ...). `batch_size`: the engine's most
    sequences per sweep."""

    def __init__(self, model=None, max_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop=None, batch_size: int = 8, **options):
        from ..api import AutoModel
        from ..engine.batch import check_tokenizer
        from ..engine.scheduler import Engine, SamplingParams
        from ..protocol import OpenAIRequests

        self.model = AutoModel.from_pretrained(model, progress=False, **options)
        check_tokenizer(self.model)
        self.params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                     stop=stop or [])
        self.engine = Engine(self.model, max_batch=batch_size)
        self.parser = OpenAIRequests(self.engine, self.model.tokenizer, "")

    def __call__(self, batch: dict) -> dict:
        from ..protocol import BadLine

        try:
            if "prompt" in batch:
                prompts = [self.parser.text_ids(str(p)) for p in batch["prompt"]]
            elif "messages" in batch:
                prompts = [self.parser.chat_ids([dict(m) for m in chat]) for chat in batch["messages"]]
            else:
                raise InputError(f"Completions needs a 'prompt' or a 'messages' column; the batch has "
                                 f"{', '.join(batch) or 'none'}")
        except BadLine as e:
            raise InputError(e.message) from None
        done = self.engine.generate(prompts, self.params)
        return {**batch, "completion": [c.text for c in done], "prompt_tokens": [c.prompt_tokens for c in done],
                "completion_tokens": [c.completion_tokens for c in done],
                "finish_reason": [c.finish_reason for c in done]}
