"""`layerstream run` and `layerstream chat`."""

from __future__ import annotations

import os
import sys

from ..utils import log
from .common import check_sampling_args, gen_kwargs, load_model, stats_line, tokenizer_of

DEMO_PROMPT = "Write a short poem about the sea."


def prompt_of(a) -> str:
    """The prompt of `run`: the argument; `-f FILE` (`-f -`: standard input); else what is piped on standard
    input (`echo question | layerstream run`); else, at a terminal or with nothing piped, the demo prompt."""
    from ..errors import InputError

    if a.file is not None:
        if a.prompt is not None:
            raise InputError("give the prompt as an argument or with -f FILE, not both")
        if a.file == "-":
            return sys.stdin.read()
        try:
            with open(a.file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read the prompt from {a.file}: {e}") from None
    if a.prompt is not None:
        return sys.stdin.read() if a.prompt == "-" else a.prompt
    if _piped():
        piped = sys.stdin.read()
        if piped.strip():
            return piped
    return DEMO_PROMPT


def _piped() -> bool:
    """Standard input is a pipe or a file (not a terminal, /dev/null or a closed descriptor)."""
    import stat

    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def cmd_run(a) -> int:
    from ..errors import InputError

    prompt = prompt_of(a)
    if not prompt.strip():
        raise InputError("the prompt is empty")
    if a.max_new_tokens <= 0:
        raise InputError(f"--max-new-tokens must be positive, got {a.max_new_tokens}")
    if a.ray is not None and a.pipeline is None:
        raise InputError("--ray needs --pipeline N here (batch jobs take --ray on their own)")
    check_sampling_args(a)   # before the model loads
    m = load_model(a)
    from transformers import TextStreamer

    tok = tokenizer_of(m)
    if not a.raw and getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt")
    else:
        enc = tok(prompt, return_tensors="pt")
    m.generate(enc, streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True), **gen_kwargs(a, m))
    print(flush=True)
    log(stats_line(m))
    return 0


class _Interrupt:
    """A stopping criterion for transformers' `generate` that Ctrl-C sets: the reply stops at the next token and
    the session goes on. A second Ctrl-C during the same reply interrupts at once, as usual."""

    def __init__(self):
        self.hit = False

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.hit, dtype=torch.bool, device=input_ids.device)

    def __enter__(self):
        import signal

        def on_sigint(signum, frame):
            if self.hit:
                raise KeyboardInterrupt
            self.hit = True

        self._old = signal.signal(signal.SIGINT, on_sigint)
        return self

    def __exit__(self, *exc):
        import signal

        signal.signal(signal.SIGINT, self._old)


def cmd_chat(a) -> int:
    from ..errors import InputError

    if a.ray is not None and a.pipeline is None:
        raise InputError("--ray needs --pipeline N (the cluster the pipeline's stages run on)")
    check_sampling_args(a)
    m = load_model(a)   # first: it says it imports torch and transformers, and how long that took
    from transformers import StoppingCriteriaList, TextStreamer

    from ..engine import ChatSession

    tokenizer_of(m)
    chat = ChatSession(m, system=a.system)
    interactive = sys.stdin.isatty()
    log("chat: type a message; /reset clears the history, /exit or Ctrl-D quits; Ctrl-C stops a reply")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            if not interactive:
                raise
            print(flush=True)
            log("(Ctrl-D or /exit quits)")
            continue
        if not line:
            break
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            chat.reset()
            log("history cleared" + (" (the system prompt kept)" if a.system else ""))
            continue
        if not line:
            continue
        try:
            with _Interrupt() as stop:
                chat.send(line, streamer=TextStreamer(m.tokenizer, skip_prompt=True, skip_special_tokens=True),
                          stopping_criteria=StoppingCriteriaList([stop]), **gen_kwargs(a, m))
        except InputError as e:
            log(f"error: {e}")
            continue
        print(flush=True)
        if stop.hit:
            log("reply stopped (kept in the history); /reset clears it, Ctrl-D quits")
        log(stats_line(m) + f"; prefilled {chat.last_prefill} new tokens")
    return 0
