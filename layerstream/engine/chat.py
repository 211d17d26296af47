"""Multi-turn chat that keeps the KV cache between turns: a new turn prefills only its new tokens."""

from __future__ import annotations

import torch

from ..errors import InputError
from .step import growing_cache


class ChatSession:
    """A chat over a model (streamed, or a Ray pipeline: there the history's keys and values stay on the stages,
    `PipelineModel.new_session`)."""

    def __init__(self, model, system: str | None = None):
        if model.tokenizer is None or not getattr(model.tokenizer, "chat_template", None):
            raise InputError("this model has no chat template; use `layerstream run` with a raw prompt")
        self.model = model
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.session = model.new_session() if hasattr(model, "new_session") else None
        self.cache = growing_cache(model) if self.session is None else None
        self.cached_ids: torch.Tensor | None = None   # the tokens whose keys/values are in the cache
        self.last_prefill = 0                          # tokens computed by the last turn's first sweep

    def _template(self) -> torch.Tensor:
        enc = self.model.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, return_tensors="pt")
        return (enc["input_ids"] if hasattr(enc, "keys") else enc)[0]

    def send(self, text: str, streamer=None, **gen) -> str:
        if not text.strip():
            raise InputError("the message is empty")
        self.messages.append({"role": "user", "content": text})
        ids = self._template()
        keep = 0
        if self.cached_ids is not None:
            n = min(len(self.cached_ids), len(ids) - 1)
            same = (self.cached_ids[:n] == ids[:n]).int()
            keep = n if bool(same.all()) else int(same.argmin())
        gen.setdefault("max_new_tokens", 256)
        if self.session is not None:
            seq = self.model.generate(ids.unsqueeze(0), session=self.session, past=keep, streamer=streamer, **gen)[0]
            self.cached_ids = seq[:-1]   # the last token is not fed
        else:
            if keep < self.cache.get_seq_length():   # (transformers' crop takes the tokens to remove, negative)
                self.cache.crop(keep - self.cache.get_seq_length())
            seq = self.model.generate(ids.unsqueeze(0), cache=self.cache, streamer=streamer,
                                      return_dict_in_generate=True, **gen).sequences[0]
            self.cached_ids = seq[: self.cache.get_seq_length()]
        self.last_prefill = len(ids) - keep
        reply = self.model.tokenizer.decode(seq[len(ids):], skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def reset(self):
        if self.session is not None:
            self.model.end_session(self.session)
        self.__init__(self.model, next((m["content"] for m in self.messages if m["role"] == "system"), None))
