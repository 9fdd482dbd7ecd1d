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


# -------------------------------------------------------------------------------------
# rows joining and leaving a batch (generate_many refills the rows that finished)


def _whole_layers(cache: Any) -> list[Any]:
    """The cache's layers, each holding every column it was given (a sliding-window layer
    past its window has dropped its oldest ones: padding or trimming it would misplace keys)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise KVCacheError(f"expected a transformers Cache with layers, got {type(cache).__name__}")
    for layer in layers:
        if getattr(layer, "is_sliding", False) and layer.is_initialized and (
                layer.cumulative_length != layer.keys.shape[-2]):
            raise KVCacheError("a sliding-window cache layer past its window cannot take new rows")
    return layers


def _set_columns(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    layer.keys, layer.values = keys, values
    if hasattr(layer, "cumulative_length"):  # sliding-window layers count what they were given
        layer.cumulative_length = keys.shape[-2]


def drop_left(cache: Any, n: int) -> None:
    """Remove the ``n`` oldest columns of every row in place (columns that are padding in
    every row: positions are carried by the keys, so nothing else changes)."""
    if n <= 0:
        return
    for layer in _whole_layers(cache):
        if layer.is_initialized:
            _set_columns(layer, layer.keys[:, :, n:], layer.values[:, :, n:])


def stack_rows(a: Any, mask_a: torch.Tensor, b: Any, mask_b: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Cache ``a``'s rows followed by ``b``'s (``b`` None: rows with nothing cached yet),
    the shorter one left-padded with masked zero columns: ``(a, mask)``, ``a`` changed in
    place. ``mask_a``/``mask_b`` are the two attention masks over the cached columns."""
    la, lb = mask_a.shape[1], mask_b.shape[1]
    width = max(la, lb)
    layers_b = _whole_layers(b) if b is not None else None
    for i, layer in enumerate(_whole_layers(a)):
        if not layer.is_initialized:
            raise KVCacheError("cannot add rows to a cache layer that holds nothing")
        ka, va = layer.keys, layer.values
        if layers_b is not None:
            kb, vb = layers_b[i].keys, layers_b[i].values
        else:
            kb = ka.new_zeros(mask_b.shape[0], ka.shape[1], 0, ka.shape[3])
            vb = va.new_zeros(mask_b.shape[0], va.shape[1], 0, va.shape[3])
        ka, va = (torch.nn.functional.pad(t, (0, 0, width - la, 0)) for t in (ka, va))
        kb, vb = (torch.nn.functional.pad(t, (0, 0, width - lb, 0)) for t in (kb, vb))
        _set_columns(layer, torch.cat([ka, kb]), torch.cat([va, vb]))
    pad = torch.nn.functional.pad
    return a, torch.cat([pad(mask_a, (width - la, 0)), pad(mask_b, (width - lb, 0))])
