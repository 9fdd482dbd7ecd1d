"""The runner (the unwrapped Hugging Face modules steerbench's passes run on) against the bridge."""

import pytest
import torch

import steerbench as sb
from steerbench.passes import forward_batch
from steerbench.runner import InsideModule, hook_count

SITES = ["blocks.{L}.hook_resid_pre", "blocks.{L}.hook_resid_post", "blocks.{L}.attn.hook_z", "blocks.{L}.hook_attn_out",
         "blocks.{L}.hook_mlp_out", "blocks.{L}.mlp.hook_pre", "blocks.{L}.mlp.hook_post", "blocks.{L}.mlp.out.hook_out",
         "hook_embed"]


def _texts(m):
    return [m.encode("The capital of France is"), m.encode("Once upon a time, in a land far away, there lived")]


def test_runner_shares_every_weight(any_model):
    ours = {p.data_ptr() for p in any_model.runner.parameters()}
    theirs = {p.data_ptr() for p in any_model.hf_model.parameters()}
    assert ours == theirs
    assert type(any_model.runner.model.layers[0]).__module__.startswith("transformers.")


@pytest.mark.parametrize("cached", [False, True])
def test_runner_logits_and_hook_values_equal_the_bridge(any_model, cached):
    """Every site steerbench hooks sees what the bridge's hook point sees; logits equal to 1e-5,
    on a left-padded batch (and, cached, on a decode step on top of it)."""
    m = any_model
    L = m.n_layers // 2
    names = [s.format(L=L) for s in SITES]
    seqs = _texts(m)
    ours: dict = {}

    def keep(act, hook):
        ours[hook.name] = act.detach().clone()

    logits, batch = forward_batch(m, seqs, extra_hooks=[(n, keep) for n in names])
    theirs: dict = {}

    def keep_bridge(name):
        def fn(act, hook):
            theirs[name] = act.detach().clone()
        return fn

    with torch.no_grad(), m.bridge.hooks(fwd_hooks=[(n, keep_bridge(n)) for n in names]):
        ref = m.bridge.forward(batch.ids, prepend_bos=False, attention_mask=batch.attention_mask,
                               position_ids=batch.positions.clamp(min=0))
    assert (logits - ref).abs().max() < 1e-5
    assert ours[f"blocks.{L}.attn.hook_z"].shape == (2, batch.ids.shape[1], m.n_heads, m.d_head)  # heads on every model
    for n in names:
        a, b = ours[n], theirs[n]
        assert (a - b.reshape(a.shape)).abs().max() <= 1e-5 * max(1.0, float(b.abs().max())), n
    if cached:
        from steerbench.kvcache import forward_cached

        ids = torch.tensor([seqs[1]])
        with torch.no_grad():
            _, cache = forward_cached(m, ids[:, :-1])
            step, _ = forward_cached(m, ids[:, -1:], cache)
            full = m.bridge.forward(ids, prepend_bos=False)
        assert (step[0, -1] - full[0, -1]).abs().max() < 1e-4


def test_names_inside_a_module_are_refused_before_anything_is_installed(model):
    before = hook_count(model.runner)
    with pytest.raises(InsideModule, match="computed inside a module.*run_with_cache"):
        sb.collect(model, ["hello"], ["blocks.2.hook_resid_post", "blocks.2.attn.hook_pattern"])
    assert hook_count(model.runner) == before == 0
    with pytest.raises(ValueError, match="unknown hook name"):
        model.site("blocks.2.hook_resid_pots")


def test_a_stopped_pass_leaves_no_hook(model):
    out = sb.collect(model, ["hello there"], ["blocks.3.hook_resid_post"])
    full = sb.collect(model, ["hello there"], ["blocks.29.hook_resid_post"])
    assert out["blocks.3.hook_resid_post"].shape == full["blocks.29.hook_resid_post"].shape
    assert hook_count(model.runner) == 0


def test_grouped_attention_is_hugging_face_eager_bit_for_bit(any_model):
    """The runner's eager attention without repeat_kv's copies gives Hugging Face's eager
    logits exactly, on a left-padded batch."""
    from steerbench.runner import GROUPED_EAGER

    m = any_model
    assert m.runner.config._attn_implementation == GROUPED_EAGER
    logits, batch = forward_batch(m, _texts(m))
    try:
        m.runner.set_attn_implementation("eager")
        plain, _ = forward_batch(m, _texts(m))
    finally:
        m.runner.set_attn_implementation(GROUPED_EAGER)
    assert logits is not None and plain is not None
    assert torch.equal(logits, plain)
