"""Where the KV cache goes, per transformers version, and a check that it was filled.

Since steerbench's passes run on the unwrapped Hugging Face modules (``steerbench.runner``),
the cache goes straight to the Hugging Face model (``past_key_values=``, ``use_cache=True``);
the bridge's attention wrapper, where transformers 5.24 broke it (below), is no longer on
that path. The bound ``transformers<5.24`` stays until a fresh install on 5.24 is tested.

Every cached forward pass in steerbench goes through :func:`forward_cached`: the token
loop's decode steps, the shared-prefix cache of the evaluators and the steered suffixes
on top of it. It is the one place that knows how the cache reaches the model, and it
checks after every pass that the cache grew by exactly the columns fed, so a library
release that silently stops filling the cache fails loudly instead of generating
``It-------``.

What was measured (transformer-lens 4.3.0, Llama-architecture model):

=====================  =================================================================
transformers           how the cache travels
=====================  =================================================================
5.0 - 5.23             ``bridge.forward(past_key_values=cache)`` hands it to the Hugging
                       Face model, whose decoder layers pass ``past_key_values=`` on to
                       each attention module; the bridge's ``AttentionBridge`` reads that
                       keyword and updates the cache. Works.
5.24                   the Hugging Face model renames the keyword to ``cache=`` (and warns
                       that ``past_key_values`` is deprecated) and passes ``cache=`` to each
                       attention module. ``AttentionBridge._update_kv_cache`` reads only
                       ``past_key_values`` / ``layer_past``, so the cache stays empty
                       (``get_seq_length() == 0``) and every decode step attends to itself
                       alone. Nothing the caller passes fixes this: the bridge itself must
                       read ``cache``. Unsupported; ``pyproject.toml`` bounds
                       ``transformers<5.24``.
=====================  =================================================================
"""

from __future__ import annotations

from typing import Any

import torch


class KVCacheError(RuntimeError):
    """The KV cache did not grow as it must: the installed libraries do not fit together."""


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries the numerics depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("transformers", "transformer-lens", "torch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def versions_line() -> str:
    return ", ".join(f"{k} {v}" for k, v in library_versions().items())


def cache_length(cache: Any) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def can_crop(cache: Any, n: int) -> bool:
    """Whether ``cache.crop(-n)`` is exact. A sliding-window layer (Gemma 3: 5 of every 6)
    keeps only its last ``window - 1`` keys once it has seen ``window`` tokens, so the
    keys a crop would bring back are gone (transformers refuses the crop then)."""
    for layer in getattr(cache, "layers", []):
        window = getattr(layer, "sliding_window", None)
        if getattr(layer, "is_sliding", False) and window is not None and layer.get_seq_length() >= window:
            return False
    return n <= cache_length(cache)


def forward_cached(model: Any, ids: torch.Tensor, cache: Any = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """``(logits, cache)`` of one pass over ``ids`` (``[batch, new]``) on top of ``cache``.

    ``cache=None`` starts a new cache. ``kwargs`` go to the runner's forward (attention
    mask, position ids, ``logits_to_keep``). The cache is extended in place and returned; it must hold
    exactly ``ids.shape[1]`` more positions afterwards, else :class:`KVCacheError`.
    """
    from steerbench.runner import forward

    before = cache_length(cache)
    logits, cache = forward(model.runner, ids, cache=cache, use_cache=True, **kwargs)
    after = cache_length(cache)
    if after != before + ids.shape[1]:
        raise KVCacheError(
            f"the KV cache held {before} positions and should hold {before + ids.shape[1]} after a "
            f"{ids.shape[1]}-token pass, but holds {after}: cached generation would ignore earlier "
            f"tokens. Installed: {versions_line()}. steerbench is tested on the versions in "
            f"constraints.txt (make install); transformers 5.24 with transformer-lens 4.3.0 is known "
            f"to leave the cache empty. Run `steerbench doctor`."
        )
    assert logits is not None
    return logits, cache
