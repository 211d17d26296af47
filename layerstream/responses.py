"""OpenAI response objects: chat.completion and text_completion bodies (tool calls parsed out of chat replies),
logprobs, usage and error bodies, and the records of a batch job's output. Requests are parsed in
`layerstream/protocol.py`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .protocol import BadLine
    from .tools import Tools


def completion_body(kind: str, rid: str, model: str, created: int, cs, tools: Tools | None = None) -> dict:
    """An OpenAI chat.completion or text_completion object for a finished request's `Completion`s (one per
    choice; or one `Completion`), chat replies parsed for `tools`' calls. Usage: the prompt once, every choice's
    tokens."""
    chat = kind == "chat"
    cs = cs if isinstance(cs, list) else [cs]
    choices = []
    for i, c in enumerate(cs):
        choice = {"index": i}
        finish = c.finish_reason
        if chat and tools is not None:
            content, calls = tools.parse(c.text, i)
            choice["message"] = {"role": "assistant", "content": content}
            if calls:
                choice["message"]["tool_calls"] = calls
                finish = "tool_calls" if finish == "stop" else finish   # (length: the calls after were cut)
        elif chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        choice.update(logprobs=logprobs_body(kind, c.logprobs), finish_reason=finish)
        choices.append(choice)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices,
            "usage": usage(cs[0].prompt_tokens, sum(c.completion_tokens for c in cs))}


def logprobs_body(kind: str, entries, offset: int = 0) -> dict | None:
    """A choice's `logprobs` for TokenLogprobs (None without them): chat's {"content": [{token, logprob, bytes,
    top_logprobs}]}, completions' {tokens, token_logprobs, top_logprobs, text_offset} (`offset`: the text's
    length before these tokens, for streamed pieces)."""
    if entries is None:
        return None
    if kind == "chat":
        def one(text, lp):
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for _, t, v in e.top]}
                            for e in entries], "refusal": None}
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t: v for _, t, v in e.top} for e in entries], "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, code: str | None, param: str | None = None,
               type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def success(req: dict, c, created: int) -> dict:
    """A batch record for a finished request (its Completion, or one per choice)."""
    d = req["digest"]
    body = completion_body(req["kind"], f"{'chatcmpl' if req['kind'] == 'chat' else 'cmpl'}-{d}", req["model"],
                           created, c, req.get("tools"))
    return {"id": f"batch_req_{d}", "custom_id": req["custom_id"],
            "response": {"status_code": 200, "request_id": f"req_{d}", "body": body}, "error": None}


def failure(req: dict, e: BadLine) -> dict:
    d = req["digest"]
    response = None
    if e.status is not None:
        response = {"status_code": e.status, "request_id": f"req_{d}",
                    "body": error_body(e.message, e.code, e.param)}
    return {"id": f"batch_req_{d}", "custom_id": req["custom_id"], "response": response,
            "error": {"code": e.code, "message": e.message}}
