"""Where steerbench's passes run: the Hugging Face modules themselves, hooked at the
boundaries TransformerLens names.

The ``TransformerBridge`` wraps every module of the Hugging Face model in place (a
``GeneralizedComponent`` with hook points around it) and calls the wrapper on every
pass, hooked or not. On the default model that costs about a third of a decode step
(measured with bench/generation_speed.py: the bridge's own ``hf_model`` runs Hugging
Face ``generate`` exactly as slowly as steerbench's loop did, 0.99x). So a model keeps
two views of the same weights:

- ``model.bridge``: the TransformerLens object, for its names (``hook_dict``), its
  config, and everything a user does with it (``run_with_cache``, ...);
- ``model.runner``: a second tree of the original Hugging Face modules, made before the
  bridge wrapped them, sharing every parameter and buffer (no copy of the weights), on
  which every steerbench pass runs: decode steps, batched scoring, collection and
  CLAS's ``grad=True`` training.

:func:`resolve_sites` is the one place a hook name becomes a module: a TransformerLens
hook point that is a component's ``hook_in`` or ``hook_out`` (aliases included:
``blocks.L.attn.hook_z`` is ``attn.o.hook_in``, ``blocks.L.hook_resid_post`` the block's
``hook_out``) is the input or the output of the Hugging Face module that component wraps.
A hook function sees exactly the tensor the bridge's hook point sees there (logits
equal the bridge's bit for bit under the same attention implementation: tests/test_runner.py).
Names computed *inside* a module (attention scores and patterns, rotary tensors, the
norms' scale) have no module boundary; steerbench's passes refuse them with a message
pointing to ``model.bridge.run_with_cache``, which has them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steerbench.context import HookFn

# -------------------------------------------------------------------------------------
# eager attention without copying the grouped keys and values

GROUPED_EAGER = "steerbench_grouped_eager"


def grouped_eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None, softcap: float | None = None,
                            **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's eager attention (the same operations in the same order: scores, soft
    cap, mask, fp32 softmax, weighted values), with the query heads that share a key/value
    head stacked into one matrix instead of the keys and values being copied to every head
    (``repeat_kv``). On a 16-row batch of TruthfulQA answers ``repeat_kv`` took 0.55 s of
    4.1 s (SmolLM2: 9 query heads on 3 key/value heads); the logits are the same bit for bit
    on both offline models (tests/test_runner.py)."""
    if module.training and dropout:
        raise NotImplementedError("grouped eager attention has no dropout (steerbench runs in eval mode)")
    b, h, t, d = query.shape
    groups = key.shape[1]
    n = h // groups
    if scaling is None:
        scaling = float(getattr(module, "head_dim")) ** -0.5
    # query heads g*n .. g*n+n-1 read key/value head g (repeat_kv's order)
    w = torch.matmul(query.reshape(b, groups, n * t, d), key.transpose(2, 3)) * scaling
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    w = w.view(b, h, t, -1)
    if attention_mask is not None:
        w = w + attention_mask
    w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(w.view(b, groups, n * t, -1), value).view(b, h, t, value.shape[-1])
    return out.transpose(1, 2).contiguous(), w


def _register_grouped_eager() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GROUPED_EAGER, grouped_eager_attention)
    AttentionMaskInterface.register(GROUPED_EAGER, eager_mask)


def runner_attention(implementation: str) -> str:
    """The attention the runner uses for a bridge that uses ``implementation``."""
    if implementation == "eager":
        _register_grouped_eager()
        return GROUPED_EAGER
    return implementation


def unwrapped_copy(hf: nn.Module) -> tuple[nn.Module, dict[int, Any]]:
    """A second module tree of ``hf`` sharing its parameters and buffers (no weight is
    copied), and the map from ``id(original module)`` to its copy. Call it before the
    bridge wraps ``hf``: the copy keeps the plain Hugging Face modules."""
    memo: dict[int, Any] = {id(t): t for t in (*hf.parameters(), *hf.buffers())}
    runner = copy.deepcopy(hf, memo)
    return runner, memo


@dataclass(frozen=True)
class ModuleSite:
    """A hook name resolved: the input (``side="in"``) or output (``"out"``) of one module
    of the runner. ``name`` is the name asked for; two aliases resolve to equal sites
    (``key``)."""

    name: str
    module: nn.Module
    side: str
    heads: int | None = None  # an attention's output before W_O: hooks see it as [B, T, heads, d_head]

    @property
    def key(self) -> tuple[int, str]:
        return (id(self.module), self.side)


class InsideModule(ValueError):
    """A hook name TransformerLens computes inside a module: no module boundary to hook."""


def resolve_sites(bridge: Any, originals: dict[int, Any]) -> tuple[dict[str, tuple[nn.Module, str, int | None]], set[str]]:
    """``{hook name: (runner module, side, heads)}`` for every bridge hook point at a module
    boundary, and the set of names computed inside a module. ``heads`` is the head count
    at the input of an attention's output projection (``hook_z``), else None."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    z_points = {id(m.o.hook_in) for m in bridge.modules()
                if isinstance(m, AttentionBridge) and isinstance(getattr(m, "o", None), GeneralizedComponent)}
    n_heads = int(bridge.cfg.n_heads)
    at: dict[int, tuple[nn.Module, str, int | None]] = {}
    for comp in bridge.modules():
        if not isinstance(comp, GeneralizedComponent):
            continue
        orig = getattr(comp, "_modules", {}).get("_original_component")
        target = originals.get(id(orig)) if orig is not None else None
        if target is None:
            continue
        for attr, side in (("hook_in", "in"), ("hook_out", "out")):
            hp = getattr(comp, attr, None)
            if hp is not None:
                at[id(hp)] = (target, side, n_heads if id(hp) in z_points else None)
    sites: dict[str, tuple[nn.Module, str, int | None]] = {}
    inside: set[str] = set()
    for name, hp in bridge.hook_dict.items():
        if id(hp) in at:
            sites[name] = at[id(hp)]
        else:
            inside.add(name)
    return sites, inside


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, tuple) else x


def _with_first(x: Any, new: torch.Tensor) -> Any:
    return (new, *x[1:]) if isinstance(x, tuple) else new


def _torch_hook(site: ModuleSite, fn: HookFn):
    if site.side == "out":
        def out_hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            new = fn(_first(output), site)
            return None if new is None else _with_first(output, new)

        return site.module.register_forward_hook(out_hook)

    def call(x: torch.Tensor) -> torch.Tensor | None:
        if site.heads is None:
            return fn(x, site)
        new = fn(x.unflatten(-1, (site.heads, -1)), site)  # a view: [B, T, heads, d_head]
        return None if new is None else new.reshape(x.shape)

    def in_hook(_module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            new = call(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = call(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return site.module.register_forward_pre_hook(in_hook, with_kwargs=True)


@contextlib.contextmanager
def hooked(pairs: Sequence[tuple[ModuleSite, HookFn]]) -> Iterator[None]:
    """Register ``fn`` at each site for the body, in order (a later hook at the same
    site sees what an earlier one returned); always removes them."""
    handles = []
    try:
        for site, fn in pairs:
            handles.append(_torch_hook(site, fn))
        yield
    finally:
        for h in handles:
            h.remove()


class _Stop(Exception):
    """Raised after the last block a pass needs (``stop_at_layer``)."""


def forward(
    runner: nn.Module,
    ids: torch.Tensor,
    *,
    cache: Any = None,
    use_cache: bool = False,
    stop_after: nn.Module | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor | None, Any]:
    """One pass of the runner: ``(logits, cache)``. ``use_cache`` extends ``cache`` (None:
    Hugging Face starts one) and returns it; ``stop_after``: a block after which the pass
    ends (logits None), e.g. the deepest block a collection reads. ``kwargs``: attention
    mask, position ids, ``logits_to_keep``. With a mask and no position ids, positions
    count the unmasked tokens (left padding), as the bridge derives them."""
    mask = kwargs.get("attention_mask")
    if mask is not None and kwargs.get("position_ids") is None:
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs["position_ids"] = pos[:, mask.shape[1] - ids.shape[1]:]
    if stop_after is None:
        out = runner(input_ids=ids, past_key_values=cache, use_cache=use_cache, **kwargs)
        return out.logits, (out.past_key_values if use_cache else None)

    def stop(*_: Any) -> None:
        raise _Stop

    handle = stop_after.register_forward_hook(stop)  # after every hook already there
    try:
        runner(input_ids=ids, past_key_values=cache, use_cache=use_cache, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return None, None


def hook_count(runner: nn.Module) -> int:
    """Forward hooks registered on the runner's modules (0 between passes)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in runner.modules())
