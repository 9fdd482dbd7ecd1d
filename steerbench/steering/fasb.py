"""FASB: Flexible Activation Steering with Backtracking (arXiv 2508.17621). Notes: docs/methods.md, FASB.

FASB composes a head readout (the K heads' probes, P(true)) and a head shift (their ITI
directions), both from ``HeadProbes.select``, and decides during generation *whether*
and *how strongly* to steer:

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

``readout``: what reads P(true). None (the default, "plain") is today's: the K heads'
probes, trained as ITI's on the last token of whole answers, read at any position. A
:class:`~steerbench.steering.readouts.PrefixReadout` or ``CalibratedReadout`` is trained
where it is read, on every token of reference answers, by position in the answer (issue 20;
``readouts.fit_readout``); FASB hands it the answer position of each token it reads.

``reading="paper"`` follows the paper's formulation instead of the reference code: the
steering vector is the probe weight theta (raw activation space), without sigma; the
strength is again ``alpha * mean(1 - P(true))`` when that exceeds ``1 - threshold``.

Multiple choice (the reference's MC mode: score, flag at the first answer token the
probes read as false, re-score steered from ``backtrack`` tokens earlier) is the
scorers' generic two-pass scoring, fed by :meth:`FASB.flagger`
(``steerbench.truthfulqa.mc_mode_scores``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass, field

import torch

from steerbench.blocks import FromState, Intervention
from steerbench.model import Model
from steerbench.steerer import Decision, Flagger, HookFn, Steerer, StepContext, StepState, check_strength
from steerbench.steering.iti import ITI, HeadReadout, HeadShift
from steerbench.steering.readouts import AnswerTokens, CalibratedReadout, PrefixReadout, choose_threshold, fit_readout

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
    readout: PrefixReadout | CalibratedReadout | None = None  # None: the heads' own probes ("plain")
    info: dict = field(default_factory=dict)
    # the paper's name for the strength (``describe``, ``select`` and ``--set fasb.alpha``
    # say alpha): ``FASB(heads, alpha=60)`` is ``FASB(heads, strength=60)``
    alpha: InitVar[float | None] = None

    observes = True

    def __post_init__(self, alpha: float | None = None) -> None:
        if alpha is not None:
            self.strength = alpha
        if not isinstance(self.heads, ITI) or not self.heads.has_probes:
            raise ValueError("FASB needs an ITI with probes: use HeadProbes.select(k) (or ITI.load of a fitted one)")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a probability, between 0 and 1; got {self.threshold}")
        if not isinstance(self.backtrack, int) or self.backtrack < 0:
            raise ValueError(f"backtrack must be a non-negative int, got {self.backtrack!r}")
        if self.reading not in READINGS:
            raise ValueError(f"reading must be one of {READINGS}, got {self.reading!r}")
        self.strength = check_strength(self.strength)
        if self.readout is not None:
            if not isinstance(self.readout, PrefixReadout | CalibratedReadout):
                raise ValueError(f"readout must be a PrefixReadout, a CalibratedReadout or None (the heads' probes), "
                                 f"got {type(self.readout).__name__}")
            if not torch.equal(self.readout.heads, self.heads.heads):
                raise ValueError(f"the readout reads heads {self.readout.heads.tolist()}, FASB steers "
                                 f"{self.heads.heads.tolist()}: fit it on these heads")
        # the two halves: what reads P(true) (the heads' probes, whose hooks every readout
        # reads through), and what is added per head at strength 1: sigma * u (reference)
        # or theta, the raw-space probe weight (paper)
        self.probes: HeadReadout = self.heads.readout
        if self.reading == "reference":
            self.shift: HeadShift = self.heads
        else:
            theta = self.probes.weight / self.probes.std  # raw-space probe weight [K, d_head]
            self.shift = HeadShift(self.heads.heads, theta.float(), torch.ones(self.heads.k), strength=1.0,
                                   fitted_on=self.heads.fitted_on)

    @classmethod
    def from_probes(cls, probes, k: int = 24, **kwargs) -> FASB:
        """FASB on the top ``k`` heads of fitted :class:`HeadProbes` (reference run: K = 24)."""
        return cls(probes.select(k, direction=kwargs.pop("direction", "mass_mean")), **kwargs)

    # -- probes ----------------------------------------------------------------------------
    @property
    def readout_name(self) -> str:
        return "plain" if self.readout is None else self.readout.name

    def p_true(self, z: torch.Tensor, pos: torch.Tensor | int | None = None) -> torch.Tensor:
        """P(true) read from head activations [..., K, d_head] at answer positions ``pos``
        [...] (0 = the answer's first token; the plain readout ignores it)."""
        if self.readout is None:
            return self.probes.p_true(z)
        if pos is None:
            raise ValueError(f"the {self.readout_name} readout needs each token's position in the answer")
        return self.readout.p_true(z, pos)

    def with_readout(self, name: str, fit: AnswerTokens | None = None, val: AnswerTokens | None = None) -> FASB:
        """This FASB reading P(true) with the readout ``name`` (``readouts.READOUTS``) fitted
        on ``fit`` (``readouts.answer_tokens`` of the fit answers; "plain" needs none) and,
        given ``val`` (other answers' tokens), its threshold chosen there
        (``readouts.choose_threshold``); else the threshold is kept."""
        if name == "plain":
            readout = None
        elif fit is not None:
            readout = fit_readout(name, self.probes, fit)
        elif name == self.readout_name:
            readout = self.readout  # this one (or plain): nothing to fit
        else:
            raise ValueError(f"the {name} readout is fitted on answer tokens: pass fit=answer_tokens(...)")
        out = dataclasses.replace(self, readout=readout)
        if val is not None:
            out.threshold = choose_threshold(out.p_true(val.z, val.pos), val)
        return out

    def plan(self, p_true: float) -> float | None:
        """The strength to steer at for an observed ``p_true``, or None for no intervention."""
        if p_true < self.threshold and self.strength != 0:  # strength 0: watch, never act
            return float(self.strength) * (1.0 - p_true)
        return None

    # -- Steerer ---------------------------------------------------------------------------
    def interventions(self) -> list[Intervention]:
        # the shift's heads, from the position FASB backed off to (none until it acts)
        return self.shift.interventions(FromState("fasb_from", self.newest_only))

    def initial_strength(self) -> float:
        return 0.0  # nothing is steered until the probes flag the text

    def check_model(self, model: Model) -> None:
        self.heads.check_model(model)

    def when_acting(self) -> Steerer:
        """ITI on the same heads at the strength FASB chooses when its probes read chance
        (P(true) = 0.5, i.e. ``alpha / 2``): what an intervention typically costs off-task.
        It steers harder when the probes are surer the answer is false, up to ``alpha``."""
        return self.shift.scaled(self.strength * 0.5)

    def monitor(self) -> FASB:
        """The same probes with threshold 0: reads P(true) at every token, never intervenes."""
        return dataclasses.replace(self, threshold=0.0)

    def hooks(self, ctx: StepContext) -> list[tuple[str, HookFn]]:
        state = ctx.state
        state.setdefault("fasb_from", None)  # first steered absolute position
        state["fasb_z"] = {}
        # the readout first, so the probes read each head's output before its own shift
        return self.probes.read_newest(state["fasb_z"]) + super().hooks(ctx)

    def observe(self, step: StepState) -> Decision | None:
        state = step.ctx.state
        if step.position <= state.get("fasb_seen", -1):
            return None  # a token fed again after a rollback was judged already
        state["fasb_seen"] = step.position
        z = torch.stack([state["fasb_z"][k] for k in range(self.heads.k)])
        p = float(self.p_true(z, step.n_generated - 1))
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
        # the last kept token (position - k) is fed again, steered, to predict the first regenerated one
        state["fasb_from"] = step.position - k
        state["fasb_seen"] = step.position - k  # the regenerated tokens are judged afresh
        return Decision(score=p, strength=s, rollback=k,
                        note=f"P(true)={judged:.2f} < {self.threshold:g}: back {k}, steer at {s:.3g}")

    # -- multiple choice ---------------------------------------------------------------------
    def flagger(self) -> Flagger:
        """FASB's MC mode for the two-pass scorers: read the K heads at every answer token of
        the unsteered pass; flag the first whose mean P(true) is below the threshold, at
        strength ``alpha * (1 - p_true)``; re-score with the shift from ``backtrack`` earlier."""
        def flag(store: dict, lengths: list[int]) -> list[tuple[int, float] | None]:
            z = self.probes.gather(store)[:, 1:]  # [B, W - 1, K, d]; column j + 1 holds answer token j
            p = self.p_true(z, torch.arange(z.shape[1]).expand(z.shape[:2]))  # [B, W - 1]
            out: list[tuple[int, float] | None] = []
            for r, n in enumerate(lengths):
                low = (p[r, :n] < self.threshold).nonzero()
                s = self.plan(float(p[r, int(low[0])])) if len(low) else None
                out.append(None if s is None else (int(low[0]), s))  # strength 0: never acts
            return out

        return Flagger(read_hooks=self.probes.read_all, flag=flag, rescore=self.shift, backtrack=self.backtrack)

    def describe(self) -> str:
        extra = ((", repeat" if self.repeat else "") + (", paper" if self.reading == "paper" else "")
                 + (f", readout={self.readout_name}" if self.readout is not None else ""))
        return (f"FASB(K={self.heads.k}, alpha={self.strength:g}, threshold={self.threshold:g}, "
                f"backtrack={self.backtrack}{extra})")
