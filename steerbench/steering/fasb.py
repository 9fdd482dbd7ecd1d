"""FASB: Flexible Activation Steering with Backtracking (arXiv 2508.17621). METHODS.md section 3.

FASB reuses ITI's head probes and directions (``HeadProbes.select``) and decides during
generation *whether* and *how strongly* to steer:

1. After each generated token (once at least ``backtrack`` tokens exist, and at EOS / the
   last step) it reads the K heads' ``hook_z`` at the newest position and averages their
   probes: ``p_true = mean_h P_h(true | z_h)``. An answer that ends before ``backtrack``
   tokens is judged at its end by the mean ``p_true`` over its tokens (its last token is
   the stop, a poor witness on its own).
2. If ``p_true < threshold``: strength ``s = alpha * (1 - p_true)``; the loop rolls back the
   last ``backtrack`` tokens (fewer if fewer were generated), crops the KV cache and
   regenerates from there with ``z[L, h] += s * sigma_h * u_h`` on every following token.
3. By default (reference code) it backtracks at most once per answer and keeps ``s`` fixed;
   ``repeat=True`` keeps checking and may back off again (the loop's ``max_rollbacks`` bounds it).

Semantics under the KV cache: keys and values computed while steering persist (ITI
semantics). The reference recomputes the whole sequence each step and steers only the
newest position; ``newest_only=True`` with ``generate(use_cache=False)`` reproduces that.
The probes read each head's own output *before* this head's shift is added (earlier
layers' shifts still reach it), so a check is never fooled by the intervention itself.

``reading="paper"`` follows the paper's formulation instead of the reference code: the
steering vector is the probe weight theta (raw activation space), without sigma; the
strength is again ``alpha * mean(1 - P(true))`` when that exceeds ``1 - threshold``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
import torch

from steerbench.artifacts import load_artifact, save_artifact
from steerbench.model import Model
from steerbench.steerer import Decision, HookFn, StepContext, StepState, Steerer
from steerbench.steering.iti import ITI, z_hook, z_hooks

READINGS = ("reference", "paper")


@dataclass
class FASB(Steerer):
    """Probe-guided steering with backtracking on the heads (and probes) of ``heads``."""

    heads: ITI  # K heads with directions, sigmas and probes
    strength: float = 60.0  # alpha
    threshold: float = 0.6
    backtrack: int = 10
    repeat: bool = False  # keep checking after the first intervention
    reading: str = "reference"
    newest_only: bool = False
    info: dict = field(default_factory=dict)

    observes = True

    def __post_init__(self) -> None:
        if not isinstance(self.heads, ITI) or not self.heads.has_probes:
            raise ValueError("FASB needs an ITI with probes: use HeadProbes.select(k) (or ITI.load of a fitted one)")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a probability, between 0 and 1; got {self.threshold}")
        if not isinstance(self.backtrack, int) or self.backtrack < 0:
            raise ValueError(f"backtrack must be a non-negative int, got {self.backtrack!r}")
        if self.reading not in READINGS:
            raise ValueError(f"reading must be one of {READINGS}, got {self.reading!r}")
        if not isinstance(self.strength, (int, float)) or self.strength != self.strength:
            raise ValueError(f"strength must be a finite number, got {self.strength!r}")
        # the vector added at strength 1 per head: sigma * u (reference) or theta (paper)
        if self.reading == "reference":
            self._shift_heads = self.heads
        else:
            theta = self.heads.probe_weight / self.heads.probe_std  # raw-space probe weight [K, d_head]
            self._shift_heads = dataclasses.replace(
                self.heads, directions=theta.float(), sigma=torch.ones(self.heads.k), strength=1.0
            )

    @classmethod
    def from_probes(cls, probes, k: int = 24, **kwargs) -> "FASB":
        """FASB on the top ``k`` heads of fitted :class:`HeadProbes` (reference run: K = 24)."""
        return cls(probes.select(k, direction=kwargs.pop("direction", "mass_mean")), **kwargs)

    # -- probes ----------------------------------------------------------------------------
    def p_true(self, z: torch.Tensor) -> torch.Tensor:
        """Mean P(true) over the K probes for head activations [..., K, d_head]."""
        return self.heads.probe_proba(z).mean(-1)

    def plan(self, p_true: float) -> float | None:
        """The strength to steer at for an observed ``p_true``, or None for no intervention."""
        if p_true < self.threshold and self.strength != 0:  # strength 0: watch, never act
            return float(self.strength) * (1.0 - p_true)
        return None

    # -- Steerer ---------------------------------------------------------------------------
    @property
    def sites(self) -> tuple[str, ...]:
        return self.heads.sites

    def check_model(self, model: Model) -> None:
        self.heads.check_model(model)

    def current_strength(self, ctx: StepContext) -> float:
        return float(ctx.state.get("fasb_strength", 0.0))

    def scaled(self, strength: float) -> "FASB":
        if not isinstance(strength, (int, float)) or strength != strength:
            raise ValueError(f"strength must be a finite number, got {strength!r}")
        return dataclasses.replace(self, strength=float(strength))

    def when_acting(self) -> ITI:
        """ITI on the same heads at the strength FASB chooses when its probes read chance
        (P(true) = 0.5, i.e. ``alpha / 2``): what an intervention typically costs off-task.
        It steers harder when the probes are surer the answer is false, up to ``alpha``."""
        return dataclasses.replace(self._shift_heads, strength=self.strength * 0.5)

    def monitor(self) -> "FASB":
        """The same probes with threshold 0: reads P(true) at every token, never intervenes."""
        return dataclasses.replace(self, threshold=0.0)

    def hooks(self, ctx: StepContext) -> list[tuple[str, HookFn]]:
        state = ctx.state
        state.setdefault("fasb_strength", 0.0)
        state.setdefault("fasb_from", None)  # first steered absolute position
        state["fasb_z"] = {}
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for k, (layer, head) in enumerate(self.heads.head_list()):
            by_layer.setdefault(layer, []).append((k, head))
        d_head = self.heads.d_head

        def capture(layer: int) -> HookFn:
            def read(z: torch.Tensor, hook) -> None:
                newest = z[0, -1]
                newest = newest.reshape(-1, d_head) if z.ndim == 3 else newest
                for k, head in by_layer[layer]:
                    state["fasb_z"][k] = newest[head].detach()

            return read

        def where(c: StepContext) -> torch.Tensor:
            start = c.state["fasb_from"]
            m = c.positions >= (start if start is not None else 1 << 62)
            if self.newest_only:
                m = m & (torch.arange(m.shape[1], device=m.device) == m.shape[1] - 1)
            return m

        steer = z_hooks(self._shift_heads, ctx, lambda: state["fasb_strength"], where)
        # capture first, so the probes read each head's output before its own shift
        return [(z_hook(L), capture(L)) for L in by_layer] + steer

    def observe(self, step: StepState) -> Decision | None:
        state = step.ctx.state
        if step.position <= state.get("fasb_seen", -1):
            return None  # a token fed again after a rollback was judged already
        state["fasb_seen"] = step.position
        z = torch.stack([state["fasb_z"][k] for k in range(self.heads.k)])
        p = float(self.p_true(z))
        seen = state.setdefault("fasb_p", {})  # position -> P(true), for the kept tokens
        seen[step.position] = p
        eligible = step.n_generated >= self.backtrack or step.is_final
        acted = state.get("fasb_checks", 0) > 0
        if not eligible or (acted and not self.repeat):
            return Decision(score=p)
        judged = p
        if step.n_generated < self.backtrack:
            # an answer that ends before `backtrack` tokens is judged once, at its end; its
            # last token is usually the stop (newline / EOS), whose P(true) says little about
            # the answer (0.61 there vs 0.35 on the content tokens in one case), so the
            # verdict is the mean over all its tokens
            first = step.position - step.n_generated + 1
            judged = sum(seen.get(q, p) for q in range(first, step.position + 1)) / step.n_generated
        s = self.plan(judged)
        if s is None:
            return Decision(score=p)
        state["fasb_checks"] = state.get("fasb_checks", 0) + 1
        k = min(self.backtrack, step.n_generated)
        state["fasb_strength"] = s
        # the last kept token (position - k) is fed again, steered, to predict the first regenerated one
        state["fasb_from"] = step.position - k
        state["fasb_seen"] = step.position - k  # the regenerated tokens are judged afresh
        return Decision(score=p, strength=s, rollback=k,
                        note=f"P(true)={judged:.2f} < {self.threshold:g}: back {k}, steer at {s:.3g}")

    def describe(self) -> str:
        extra = (", repeat" if self.repeat else "") + (", paper" if self.reading == "paper" else "")
        return (f"FASB(K={self.heads.k}, alpha={self.strength:g}, threshold={self.threshold:g}, "
                f"backtrack={self.backtrack}{extra})")

    # -- artifacts -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Saved as its ITI heads with FASB's parameters in the header."""
        tensors = self.heads.tensors()
        header = {
            "method": "FASB",
            "params": {"strength": self.strength, "threshold": self.threshold, "backtrack": self.backtrack,
                       "repeat": self.repeat, "reading": self.reading, "newest_only": self.newest_only,
                       "direction": self.heads.direction},
            "hooks": list(self.sites),
            "fitted_on": self.heads.fitted_on,
            "info": {**self.heads.info, **self.info},
        }
        return save_artifact(path, tensors, header)

    @classmethod
    def load(cls, path: str | Path, model: Model | None = None) -> "FASB":
        tensors, header = load_artifact(path)
        if header.get("method") != "FASB":
            raise ValueError(f"{path} holds a {header.get('method')} artifact, not FASB")
        p = header["params"]
        f = cls(ITI.from_tensors(tensors, header), strength=p["strength"], threshold=p["threshold"], backtrack=p["backtrack"],
                repeat=p["repeat"], reading=p["reading"], newest_only=p["newest_only"])
        if model is not None:
            f.check_model(model)
        return f


# -------------------------------------------------------------------------------------
# MC mode (reference): steer an answer only from where the probes flag it


@dataclass
class _RowStrengths(Steerer):
    """Static steering on FASB's heads with one strength per batch row (MC mode's second pass)."""

    shift: ITI
    rows: torch.Tensor  # [batch]
    strength: float = 1.0

    @property
    def sites(self) -> tuple[str, ...]:
        return self.shift.sites

    def hooks(self, ctx: StepContext) -> list[tuple[str, HookFn]]:
        return z_hooks(self.shift, ctx, lambda: self.rows)


@dataclass
class MCModeResult:
    """MC scores under FASB's MC mode, and how often and how strongly it intervened."""

    result: "MCResult"  # noqa: F821
    logprobs: list[float]  # every answer's score, in mc_items order
    rescored: float  # share of answers re-scored with steering
    strengths: list[float]  # strength of each re-scored answer
    strengths_by_answer: list[float | None]  # in mc_items order; None where not re-scored
    first_flag: list[int]  # answer-token index that triggered it


def mc_mode_scores(model: Model, questions, fasb: FASB, prompt: str = "instruction+primer",
                   batch_size: int = 16) -> MCModeResult:
    """TruthfulQA MC scores the way FASB's reference scores multiple choice.

    Each answer is scored unsteered while the K heads are read at every answer token; at
    the first answer token whose mean P(true) is below the threshold, the answer is scored
    again with ``alpha * (1 - p_true)`` steering from ``backtrack`` tokens earlier (not
    before the last prompt token). Answers never flagged keep their unsteered score. This
    partly re-ranks answers by the probes' verdict, so it is reported apart from uniform
    steering.
    """
    from steerbench.generation import SharedHead, steered_suffixes
    from steerbench.truthfulqa import mc_items, mc_result

    fasb.check_model(model)
    prompts, conts = mc_items(model, questions, prompt)
    seqs = [list(p.ids) + list(c) for p, c in zip(prompts, conts)]
    split = [len(p.ids) - 1 for p in prompts]
    head = SharedHead.of(model, [p.ids for p in prompts], limit=min(split) - 1)
    scores = torch.empty(len(seqs), dtype=torch.float64)
    strengths, flags = [], []
    by_answer: list[float | None] = [None] * len(seqs)
    heads = fasb.heads.head_list()
    layers = sorted({l for l, _ in heads})
    d_head = fasb.heads.d_head

    def logprob(logits: torch.Tensor, rows: list[int]) -> list[float]:
        out = []
        for r, i in enumerate(rows):
            n = len(conts[i])
            lp = torch.log_softmax(logits[r, :n].float(), -1)  # column j predicts answer token j
            out.append(float(lp.gather(-1, torch.as_tensor(conts[i])[:, None]).sum()))
        return out

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for at in range(0, len(order), batch_size):
        idx = order[at : at + batch_size]
        z: dict[int, torch.Tensor] = {}

        def capture(layer):
            def read(act, hook):
                a = act.detach()
                z[layer] = (a.reshape(*a.shape[:2], -1, d_head) if a.ndim == 3 else a).cpu()
            return read

        hooks = [(z_hook(L), capture(L)) for L in layers]
        sub = [seqs[i] for i in idx]
        sp = [split[i] for i in idx]
        (_, logits), = steered_suffixes(model, sub, sp, sp, [None], head, extra_hooks=hooks)
        base = logprob(logits, idx)
        # z of the K heads at every column: [B, W, K, d_head]; column j + 1 holds answer token j
        zk = torch.stack([z[l][:, :, h] for l, h in heads], dim=2)
        p = fasb.p_true(zk)  # [B, W]
        again, rows_s, steer_from = [], [], []
        for r, i in enumerate(idx):
            scores[i] = base[r]
            n = len(conts[i])
            low = (p[r, 1 : n + 1] < fasb.threshold).nonzero()
            if len(low) == 0:
                continue
            j = int(low[0])
            s = fasb.plan(float(p[r, j + 1]))
            pos = len(prompts[i].ids) + j  # absolute position of the flagged answer token
            again.append(i)
            rows_s.append(s)
            steer_from.append(max(pos - fasb.backtrack, split[i]))
            strengths.append(s)
            by_answer[i] = s
            flags.append(j)
        if again and fasb.strength != 0:
            steer = _RowStrengths(fasb._shift_heads, torch.tensor(rows_s))
            (_, logits), = steered_suffixes(model, [seqs[i] for i in again], [split[i] for i in again],
                                            steer_from, [steer], head)
            for i, v in zip(again, logprob(logits, again)):
                scores[i] = v
    res = mc_result(questions, scores.tolist(), prompt)
    res.info = {"mc_rescored": len(strengths) / len(seqs), "mc_strengths": strengths, "mc_first_flag": flags}
    return MCModeResult(res, scores.tolist(), len(strengths) / len(seqs), strengths, by_answer, flags)
