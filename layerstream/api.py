"""The factory above the two kinds of model: `AutoModel.from_pretrained` opens a `StreamedModel` in this process
(layerstream.engine) or a `PipelineModel` whose layers are split over Ray actors (layerstream.ray). Both are what
the engine drives (`Engine(model)`): the streamed model through engine/kv.py's `SlabStep`, the pipeline through its
`slab_runner()`. Neither the engine nor the model imports the other kind."""

from __future__ import annotations

from .options import Options


class AutoModel:
    """Drop-in for AirLLM's `AutoModel`: `AutoModel.from_pretrained(source, ...)`."""

    @staticmethod
    def from_pretrained(source=None, options: Options | None = None, **kwargs):
        """Open `source` (None: the embedded default model; a transformers directory; a .gguf file; a hub id;
        a layerstream store), splitting it into a store once, and return a streaming model.

        Keywords are `Options` fields (or pass `options=`): device, dtype, max_ram / max_gpu_memory (bytes or
        strings like "2GB" bounding the weights kept resident between sweeps and the buffers in flight; 0:
        nothing resident; default: what is free, with a margin), compression ("int8" / "int4", AirLLM's
        "8bit" / "4bit": a block-wise quantized store), store_path, in_place, prefetch, lookahead, io,
        readers, threads, verify, profiling, progress; pipeline (N: the layers split over N Ray actors, a
        `layerstream.ray.pipeline.PipelineModel`)."""
        opts = options if options is not None else Options.from_kwargs(kwargs)
        if opts.pipeline:
            from .ray.pipeline import PipelineModel

            return PipelineModel(source, opts)
        from .engine.model import open_streamed

        return open_streamed(source, opts)
