"""REAL: which heads to steer, by vector-quantized autoencoder relevance (arXiv 2506.08359,
ICLR 2026). Notes: docs/methods.md, REAL.

REAL keeps ITI's steering (mass-mean direction, sigma, every position) and replaces its
choice of heads: instead of "rank heads by probe accuracy", each head gets a learned
*relevance*, and the relevance also sets each selected head's strength.

1. Features are ITI's: every head's ``hook_z`` at the last token of ``"Q: {q} A: {a}"``,
   labelled true / false, split by question into fit and validation (ITI's split, so the
   two rankings see the same answers).
2. Per head, a VQ autoencoder (:class:`VQAutoencoders`): encoder Linear(d, d) ->
   LeakyReLU(0.01) -> Linear(d, U * c), split into U units of c; each unit snaps to the
   nearest of C codes (one codebook per head, EMA updates, straight-through gradient); the
   decoder mirrors the encoder. Loss = MSE + beta * commitment + lambda * supervised
   contrastive loss on the quantized units (temperature tau). Defaults are the
   reference's: U = 8, c = 8, C = 32, decay 0.99, beta 0.25, lambda 1e-3, tau 0.07,
   Adam lr 1e-3, batch 32, 20 epochs. ``relevant_units=U_r`` applies the contrastive loss
   to the first U_r units only (the paper's relevant / irrelevant split; the released code
   uses all units, which is the default).
3. Relevance: each answer becomes its sequence of U code ids. ``scorer="gru"``: two GRU
   priors (embedding 64, hidden 64) per head, one trained on the true answers' sequences
   and one on the false ones'; a validation answer scores ``(log p_true - log p_false) / U``
   and the relevance is the ROC-AUC of that score. ``scorer="probe"``: a logistic probe on
   the one-hot codes (``fit_code_probes``), relevance = its validation ROC-AUC.
4. The top K heads by relevance are steered like ITI with a weight
   ``w_h = relevance_h / max relevance``: ``z[L, h] += alpha * w_h * sigma_h * u_h``.

Everything is trained for all heads at once: the 270 autoencoders (and then the 540
priors) of SmolLM2-135M are one module with a leading head dimension, batched matrix
products, one optimiser step for all. Each head's loss is its own mean and Adam is
elementwise, so a head's parameters follow the same path as if trained alone (with the
same initialisation, drawn from ``seed`` and the head's index, and the same batches);
``tests/test_real.py`` checks it.

Where this differs from the released code (utils.py of github.com/liam0949/REAL_ICLR):
- The EMA codebook starts its averages at zero, so after the first update a used code is
  the mean of the vectors assigned to it and an unused code keeps its initial value. The
  reference starts the sums at the initial codebook and the counts at zero without bias
  correction (VectorQuantizerEMA, utils.py:1630), which scales early codes by up to
  1 / (1 - decay).
- The GRU priors predict code t from codes < t (a start token first); the reference feeds
  code t and scores code t at the same step (GRUPrior.forward, utils.py:1954, with the loss
  at utils.py:1846), and trains one prior on true answers only. Here there are two priors
  and a log-likelihood ratio, as the paper describes.
- The supervised contrastive loss does not count an answer as its own positive (the
  reference's label mask keeps the diagonal, utils.py:1722).
- Inputs are standardized per feature with the fit answers' mean and std, so one loss
  weighting suits every head of every model; heads whose codebook collapses are kept
  (with the AUC they earn) rather than set to 0 (utils.py:1585, train_single_adaptor).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from steerbench.activations import collect_heads
from steerbench.datasets import MCQuestion, qa_examples
from steerbench.model import Model
from steerbench.probes import roc_auc
from steerbench.steering.iti import TEMPLATE, HeadProbes, HeadShift, questions_hash

SCORERS = ("gru", "probe")
DEFAULT_SCORER = "probe"  # docs/methods.md, REAL: steered better in the TruthfulQA bench, 6x faster than the GRU priors
WEIGHTINGS = ("auc", "none")


def _generators(seed: int, module_ids: Sequence[int]) -> list[torch.Generator]:
    # one stream per module: module m's initial weights do not depend on which others train with it
    return [torch.Generator().manual_seed(int(seed) * 1_000_003 + int(m)) for m in module_ids]


def _uniform(gens: Sequence[torch.Generator], shape: tuple[int, ...], bound: float) -> torch.Tensor:
    return torch.stack([(torch.rand(shape, generator=g) * 2 - 1) * bound for g in gens])


class _Linears(torch.nn.Module):
    """M independent Linear(d_in, d_out) layers applied as one batched product:
    [M, B, d_in] -> [M, B, d_out]. Initialised like ``torch.nn.Linear`` (uniform in
    +-1/sqrt(d_in)), each module from its own generator."""

    def __init__(self, gens: Sequence[torch.Generator], d_in: int, d_out: int):
        super().__init__()
        bound = 1 / math.sqrt(d_in)
        self.weight = torch.nn.Parameter(_uniform(gens, (d_in, d_out), bound))
        self.bias = torch.nn.Parameter(_uniform(gens, (1, d_out), bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class VQAutoencoders(torch.nn.Module):
    """M vector-quantized autoencoders (one per head), trained as one module.

    ``forward(x)`` takes standardized inputs [M, B, d] and returns (reconstruction
    [M, B, d], straight-through quantized units [M, B, U, c], code ids [M, B, U],
    commitment loss [M]); in training mode it also moves each codebook by EMA
    (``ema_update``).
    """

    embed: torch.Tensor  # [M, C, c] buffers: the codebooks, and their EMA counts and sums
    ema_count: torch.Tensor
    ema_sum: torch.Tensor

    def __init__(self, module_ids: Sequence[int], d: int, units: int = 8, code_dim: int = 8, codebook: int = 32,
                 decay: float = 0.99, eps: float = 1e-5, seed: int = 0):
        super().__init__()
        if units < 1 or code_dim < 1 or codebook < 2:
            raise ValueError(f"need units >= 1, code_dim >= 1 and codebook >= 2, got {units}, {code_dim}, {codebook}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        gens = _generators(seed, module_ids)
        self.units, self.code_dim, self.codebook, self.decay, self.eps = units, code_dim, codebook, decay, eps
        self.enc1 = _Linears(gens, d, d)
        self.enc2 = _Linears(gens, d, units * code_dim)
        self.dec1 = _Linears(gens, units * code_dim, d)
        self.dec2 = _Linears(gens, d, d)
        M = len(gens)
        self.register_buffer("embed", torch.stack([torch.randn(codebook, code_dim, generator=g) for g in gens]))
        self.register_buffer("ema_count", torch.zeros(M, codebook))
        self.register_buffer("ema_sum", torch.zeros(M, codebook, code_dim))

    @property
    def n_modules(self) -> int:
        return int(self.embed.shape[0])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous units [M, B, U, c] of standardized inputs [M, B, d]."""
        h = F.leaky_relu(self.enc1(x), 0.01)
        return self.enc2(h).view(x.shape[0], x.shape[1], self.units, self.code_dim)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Code ids [M, B, U]: each unit's nearest codebook entry (squared L2)."""
        M, B, U, c = z.shape
        e = self.embed
        # |e|^2 - 2 z.e (|z|^2 is the same for every code), in one batched product
        dist = torch.baddbmm((e * e).sum(-1)[:, None, :], z.reshape(M, B * U, c), e.transpose(1, 2), alpha=-2)
        return dist.argmin(-1).view(M, B, U)

    def quantize(self, idx: torch.Tensor) -> torch.Tensor:
        """Codebook vectors [M, B, U, c] of code ids [M, B, U]."""
        M, B, U = idx.shape
        return torch.gather(self.embed, 1, idx.reshape(M, B * U, 1).expand(-1, -1, self.code_dim)).view(
            M, B, U, self.code_dim)

    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        """Move every codebook toward the mean of the units assigned to each code:
        count_k <- decay * count_k + (1 - decay) * n_k, sum_k likewise with the units' sum,
        code_k = sum_k / count_k (counts Laplace-smoothed by eps); a code never used keeps
        its value."""
        M, B, U, c = z.shape
        C = self.codebook
        flat = (idx.reshape(M, B * U) + torch.arange(M, device=idx.device)[:, None] * C).reshape(-1)
        # counts and sums per (module, code) by bincount / index_add: 6x faster than one-hot products here
        counts = torch.bincount(flat, minlength=M * C).view(M, C).to(z.dtype)
        sums = torch.zeros(M * C, c, dtype=z.dtype, device=z.device).index_add_(0, flat, z.reshape(-1, c))
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums.view(M, C, c), alpha=1 - self.decay)
        n = self.ema_count.sum(1, keepdim=True)
        smoothed = (self.ema_count + self.eps) / (n + self.codebook * self.eps) * n
        used = self.ema_count > 0
        self.embed.copy_(torch.where(used[..., None], self.ema_sum / smoothed.clamp_min(1e-30)[..., None], self.embed))

    def forward(self, x: torch.Tensor):
        z = self.encode(x)
        idx = self.nearest(z.detach())
        q = self.quantize(idx)
        commitment = ((q - z) ** 2).mean(dim=(1, 2, 3))  # [M]: the encoder is pulled to its codes
        if self.training:
            self.ema_update(z.detach(), idx)
        q_st = z + (q - z).detach()  # straight-through: the decoder's gradient reaches the encoder unchanged
        h = F.leaky_relu(self.dec1(q_st.reshape(x.shape[0], x.shape[1], -1)), 0.01)
        return self.dec2(h), q_st, idx, commitment


def supervised_contrastive(z: torch.Tensor, labels: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) per module: z [M, B, D], labels [B] -> [M].

    For each anchor with at least one other answer of its label in the batch, minus the
    mean over those positives of log softmax_j(cos(z_i, z_j) / tau), j over the other
    answers; averaged over such anchors (0 when there is none)."""
    M, B, _ = z.shape
    u = F.normalize(z, dim=-1)
    logits = torch.bmm(u, u.transpose(1, 2)) / tau  # [M, B, B]
    eye = torch.eye(B, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye  # [B, B]
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return z.new_zeros(M)
    per_anchor = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(-1) / n_pos.clamp_min(1)  # [M, B]
    return -(per_anchor[:, has]).mean(1)


@dataclass
class VQFit:
    """What :func:`train_vqae` returns: the trained module, the standardization, and per
    module the final epoch's mean reconstruction MSE and codebook perplexity."""

    model: VQAutoencoders
    mean: torch.Tensor  # [M, d]
    std: torch.Tensor  # [M, d]
    recon: torch.Tensor  # [M]
    perplexity: torch.Tensor  # [M]: exp(entropy) of the code usage in the last epoch (C = all codes used evenly)
    seconds: float = 0.0

    @torch.no_grad()
    def codes(self, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Code ids [M, N, U] of raw inputs [N, M, d]."""
        self.model.eval()
        out = []
        for i in range(0, x.shape[0], chunk):
            xs = (x[i:i + chunk].transpose(0, 1).float() - self.mean[:, None]) / self.std[:, None]
            out.append(self.model.nearest(self.model.encode(xs)))
        return torch.cat(out, 1)


def _check_features(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x)
    labels = torch.as_tensor(labels).long().reshape(-1)
    if x.ndim != 3:
        raise ValueError(f"features must be [N, modules, d], got shape {tuple(x.shape)}")
    if x.shape[0] != labels.numel():
        raise ValueError(f"{x.shape[0]} feature rows but {labels.numel()} labels")
    if x.shape[0] < 2:
        raise ValueError("need at least 2 answers to train an autoencoder")
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    if not set(labels.unique().tolist()) <= {0, 1}:
        raise ValueError("labels must be 0 (false) or 1 (true)")
    return x, labels


def _check_scorers(scorers: Sequence[str]) -> None:
    bad = [s for s in scorers if s not in SCORERS]
    if bad or not scorers:
        raise ValueError(f"scorers must be some of {SCORERS}, got {list(scorers)}")


@torch.enable_grad()  # trains under a caller's no_grad too (the bench scores with gradients off)
def train_vqae(x: torch.Tensor, labels: torch.Tensor, *, module_ids: Sequence[int] | None = None,
               units: int = 8, code_dim: int = 8, codebook: int = 32, decay: float = 0.99,
               beta: float = 0.25, contrastive: float = 1e-3, tau: float = 0.07, relevant_units: int | None = None,
               lr: float = 1e-3, batch_size: int = 32, epochs: int = 20, seed: int = 0,
               progress: bool | None = None) -> VQFit:
    """Train one VQ autoencoder per module of ``x`` [N, M, d] (labels [N], 1 = true) at once.

    ``module_ids``: an id per module that seeds its initialisation (default 0..M-1), so that
    training module m alone (``x[:, [m]]``, ``module_ids=[m]``) starts where it starts here;
    the batches come from ``seed`` alone, so they are the same too.
    ``relevant_units``: the contrastive loss sees only the first this-many units.
    """
    x, labels = _check_features(x, labels)
    N, M, d = x.shape
    ids = list(range(M)) if module_ids is None else [int(m) for m in module_ids]
    if len(ids) != M:
        raise ValueError(f"{M} modules but {len(ids)} module_ids")
    if relevant_units is not None and not 1 <= relevant_units <= units:
        raise ValueError(f"relevant_units must be between 1 and units={units}, got {relevant_units}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be at least 1, got {epochs} and {batch_size}")
    t0 = time.perf_counter()
    xs = x.transpose(0, 1).float()  # [M, N, d]
    mean = xs.mean(1)
    std = xs.std(1).clamp_min(1e-6)
    xs = ((xs - mean[:, None]) / std[:, None]).contiguous()
    vq = VQAutoencoders(ids, d, units, code_dim, codebook, decay, seed=seed)
    # fused: one kernel for all parameters, 3.9 ms a step for the 270 autoencoders against 13.8 ms (foreach)
    opt = torch.optim.Adam(vq.parameters(), lr=lr, fused=True)
    gen = torch.Generator().manual_seed(int(seed))
    r = relevant_units or units
    vq.train()
    show = progress if progress is not None else M * N * epochs > 5e6
    usage = torch.zeros(M, codebook)
    for epoch in tqdm(range(epochs), desc="REAL autoencoders", disable=not show, leave=False):
        perm = torch.randperm(N, generator=gen)
        recon_sum = torch.zeros(M)
        usage.zero_()
        for i in range(0, N, batch_size):
            b = perm[i:i + batch_size]
            xb = xs[:, b]
            x_hat, q, idx, commitment = vq(xb)
            mse = ((x_hat - xb) ** 2).mean(dim=(1, 2))
            loss = mse + beta * commitment
            if contrastive:
                loss = loss + contrastive * supervised_contrastive(q[:, :, :r].reshape(M, len(b), -1), labels[b], tau)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()  # heads are independent: the sum's gradient is each head's own
            opt.step()
            recon_sum += mse.detach() * len(b)
            if epoch == epochs - 1:
                flat = (idx.reshape(M, -1) + torch.arange(M)[:, None] * codebook).reshape(-1)
                usage += torch.bincount(flat, minlength=M * codebook).view(M, codebook)
        recon = recon_sum / N
    p = usage / usage.sum(1, keepdim=True)
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum(1))
    vq.eval()
    return VQFit(vq, mean, std, recon, perplexity, time.perf_counter() - t0)


class GRUPriors(torch.nn.Module):
    """M autoregressive GRU models over code sequences (one per head and class), as one
    module. Code t is predicted from a start token and codes < t; the GRU cell is
    ``torch.nn.GRU``'s (gates r, z, n), written out so that M of them run as batched
    products, with each gate's hidden weights apart (slicing one [H, 3H] matrix made the
    backward pass concatenate at every step)."""

    def __init__(self, module_ids: Sequence[int], codebook: int, emb: int = 64, hidden: int = 64, seed: int = 0):
        super().__init__()
        gens = _generators(seed, module_ids)
        self.codebook, self.hidden = codebook, hidden
        self.embed = torch.nn.Parameter(torch.stack([torch.randn(codebook + 1, emb, generator=g) for g in gens]))
        bound = 1 / math.sqrt(hidden)  # torch.nn.GRU's initialisation
        self.w_ih = torch.nn.Parameter(_uniform(gens, (emb, 3 * hidden), bound))
        self.b_ih = torch.nn.Parameter(_uniform(gens, (1, 3 * hidden), bound))
        self.w_hh = torch.nn.ParameterList([torch.nn.Parameter(_uniform(gens, (hidden, hidden), bound)) for _ in "rzn"])
        self.b_hh = torch.nn.ParameterList([torch.nn.Parameter(_uniform(gens, (1, hidden), bound)) for _ in "rzn"])
        self.out = _Linears(gens, hidden, codebook)

    def log_prob(self, codes: torch.Tensor) -> torch.Tensor:
        """Per-token log-probabilities [M, B, T] of code sequences [M, B, T]."""
        M, B, T = codes.shape
        V = self.codebook + 1
        start = torch.full((M, B, 1), self.codebook, dtype=torch.long, device=codes.device)
        inputs = torch.cat([start, codes[:, :, :-1]], 2)  # teacher forcing: the code before each position
        # input gates through a table, (embedding @ W_ih + b_ih) for each of the C + 1 tokens, read by row
        table = torch.baddbmm(self.b_ih, self.embed, self.w_ih).reshape(M * V, -1)
        rows = (inputs + torch.arange(M, device=codes.device)[:, None, None] * V).reshape(-1)
        H = self.hidden
        gates = table.index_select(0, rows).view(M, B, T, 3, H).unbind(3)
        i_r, i_z, i_n = (g.unbind(2) for g in gates)
        (w_r, w_z, w_n), (b_r, b_z, b_n) = self.w_hh, self.b_hh
        h = table.new_zeros((M, B, H))
        outs = []
        for t in range(T):
            r = torch.sigmoid(i_r[t] + torch.baddbmm(b_r, h, w_r))
            z = torch.sigmoid(i_z[t] + torch.baddbmm(b_z, h, w_z))
            n = torch.tanh(i_n[t] + r * torch.baddbmm(b_n, h, w_n))
            h = n + z * (h - n)  # (1 - z) * n + z * h
            outs.append(h)
        logits = self.out(torch.stack(outs, 2).view(M, B * T, H)).view(M, B, T, -1)
        return torch.log_softmax(logits, -1).gather(-1, codes[..., None])[..., 0]


@torch.enable_grad()
def train_priors(codes: torch.Tensor, *, codebook: int, module_ids: Sequence[int] | None = None, emb: int = 64,
                 hidden: int = 64, lr: float = 1e-3, weight_decay: float = 0.01, batch_size: int = 32,
                 epochs: int = 6, seed: int = 0, progress: bool | None = None) -> GRUPriors:
    """One GRU prior per module on its code sequences ``codes`` [M, N, T] (the same N
    answers for every module), trained with AdamW on the mean next-code cross-entropy."""
    M, N, T = codes.shape
    if N < 1:
        raise ValueError("need at least one code sequence to train a prior")
    ids = list(range(M)) if module_ids is None else [int(m) for m in module_ids]
    priors = GRUPriors(ids, codebook, emb, hidden, seed=seed)
    opt = torch.optim.AdamW(priors.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    gen = torch.Generator().manual_seed(int(seed))
    show = progress if progress is not None else M * N * epochs > 2e6
    for _ in tqdm(range(epochs), desc="REAL priors", disable=not show, leave=False):
        perm = torch.randperm(N, generator=gen)
        for i in range(0, N, batch_size):
            lp = priors.log_prob(codes[:, perm[i:i + batch_size]])
            opt.zero_grad(set_to_none=True)
            (-lp.mean(dim=(1, 2))).sum().backward()
            opt.step()
    return priors


@torch.no_grad()
def prior_scores(true_prior: GRUPriors, false_prior: GRUPriors, codes: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Length-normalised log-likelihood ratio [M, N] of code sequences [M, N, T]."""
    out = []
    for i in range(0, codes.shape[1], chunk):
        c = codes[:, i:i + chunk]
        out.append((true_prior.log_prob(c) - false_prior.log_prob(c)).mean(-1))
    return torch.cat(out, 1)


def _code_features(codes: torch.Tensor, codebook: int) -> torch.Tensor:
    """[M, N * U]: each unit's code id as an index into the U * codebook one-hot features."""
    M, N, U = codes.shape
    return (codes + torch.arange(U)[None, None, :] * codebook).reshape(M, N * U)


def fit_code_probes(codes: torch.Tensor, y: torch.Tensor, codebook: int, C: float = 1.0, max_iter: int = 500,
                    tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """One L2 logistic regression per module on its one-hot codes: codes [M, N, U] (ids
    below ``codebook``), y [N] in {0, 1}. The objective is sklearn's ``LogisticRegression(C)``
    divided by N (mean BCE + ||w||^2 / (2 C N), bias unpenalized), minimised for every module
    at once by one L-BFGS in float64. The one-hot features are never built: a logit is the
    bias plus U gathered weights, and the gradient is a scatter-add (``probes.fit_probes`` on
    dense one-hot features took 87 s for 270 heads x 3,700 answers, this 32 s for 4,700). ``tol``
    bounds the largest gradient entry: at 1e-4 validation AUCs are within 3e-4 of those at 1e-6.
    Returns (W [M, U, codebook], b [M])."""
    M, N, U = codes.shape
    feat = _code_features(codes, codebook)
    target = y.to(torch.float64).expand(M, N)
    lam = 1.0 / (C * N)
    W = torch.zeros(M, U * codebook, dtype=torch.float64)
    b = torch.zeros(M, dtype=torch.float64)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=tol,
                            tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        with torch.no_grad():
            logits = torch.gather(W, 1, feat).view(M, N, U).sum(-1) + b[:, None]
            loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1).sum()
            loss += 0.5 * lam * (W * W).sum()
            g = (torch.sigmoid(logits) - target) / N  # [M, N]
            W.grad = torch.zeros_like(W).scatter_add_(1, feat, g.repeat_interleave(U, dim=1)) + lam * W
            b.grad = g.sum(1)
        return loss

    opt.step(closure)
    return W.view(M, U, codebook), b


def code_probe_logits(W: torch.Tensor, b: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Logits [M, N] of the code probes (``fit_code_probes``) on codes [M, N, U]."""
    M, N, U = codes.shape
    feat = _code_features(codes, W.shape[-1])
    return torch.gather(W.reshape(M, -1), 1, feat).view(M, N, U).sum(-1) + b[:, None]


def code_probe_auc(codes_fit: torch.Tensor, y_fit: torch.Tensor, codes_val: torch.Tensor, y_val: torch.Tensor,
                   codebook: int) -> torch.Tensor:
    """Validation ROC-AUC [M] of a logistic probe per module on its one-hot codes
    (``fit_code_probes``), trained on ``codes_fit`` [M, N_fit, U] and scored on ``codes_val``."""
    W, b = fit_code_probes(codes_fit, y_fit, codebook)
    return roc_auc(code_probe_logits(W, b, codes_val), y_val.to(torch.float64)).float()


def score_codes(codes: torch.Tensor, y: torch.Tensor, train_idx, val_idx, scorer: str, codebook: int,
                gru_epochs: int = 6, seed: int = 0, module_ids: Sequence[int] | None = None,
                progress: bool | None = None) -> torch.Tensor:
    """One scorer's relevance [M] from code sequences [M, N, U] of N answers (labels y [N]):
    trained on the rows ``train_idx``, ROC-AUC on the rows ``val_idx`` (0.5 where undefined)."""
    _check_scorers([scorer])
    tr, va = torch.as_tensor(train_idx, dtype=torch.long), torch.as_tensor(val_idx, dtype=torch.long)
    codes = codes.long()
    c_fit, c_val = codes[:, tr], codes[:, va]
    if scorer == "gru":
        yt = y[tr]
        pt = train_priors(c_fit[:, yt == 1], codebook=codebook, epochs=gru_epochs, seed=seed, module_ids=module_ids,
                          progress=progress)
        pf = train_priors(c_fit[:, yt == 0], codebook=codebook, epochs=gru_epochs, seed=seed + 1,
                          module_ids=module_ids, progress=progress)
        rel = roc_auc(prior_scores(pt, pf, c_val).double(), y[va].double()).float()
    else:
        rel = code_probe_auc(c_fit, y[tr], c_val, y[va], codebook)
    return torch.nan_to_num(rel, nan=0.5)


def module_relevance(x: torch.Tensor, labels, train_idx, val_idx, scorers: Sequence[str] = SCORERS,
                     gru_epochs: int = 6, seed: int = 0, module_ids: Sequence[int] | None = None,
                     progress: bool | None = None,
                     **vq_settings) -> tuple[dict[str, torch.Tensor], VQFit, torch.Tensor, dict[str, float]]:
    """REAL's relevance of every module of ``x`` [N, M, d] (labels [N], 1 = true): autoencoders
    trained on the rows ``train_idx``, relevance = ROC-AUC on the rows ``val_idx`` of each
    scorer's score. ``module_ids`` seed each module's initialisation (``train_vqae``).
    Returns ({scorer: [M]}, the autoencoders, the code ids [M, N, U] of every row of ``x``,
    seconds per stage)."""
    _check_scorers(scorers)
    x, y = _check_features(x, labels)
    tr, va = torch.as_tensor(train_idx, dtype=torch.long), torch.as_tensor(val_idx, dtype=torch.long)
    for name, rows in (("training", tr), ("validation", va)):
        if len(set(y[rows].tolist())) < 2:
            raise ValueError(f"the {name} answers need both true and false ones to rank modules")
    seconds: dict[str, float] = {}
    vq = train_vqae(x[tr], y[tr], seed=seed, module_ids=module_ids, progress=progress, **vq_settings)
    seconds["autoencoders"] = vq.seconds
    t0 = time.perf_counter()
    codes = vq.codes(x)
    seconds["codes"] = time.perf_counter() - t0
    relevance = {}
    for scorer in scorers:
        t0 = time.perf_counter()
        relevance[scorer] = score_codes(codes, y, tr, va, scorer, vq.model.codebook, gru_epochs=gru_epochs, seed=seed,
                                        module_ids=module_ids, progress=progress)
        seconds[scorer] = time.perf_counter() - t0
    return relevance, vq, codes, seconds


@dataclass
class HeadRelevance:
    """REAL's relevance of every attention head, fitted on training questions, next to the
    ITI head probes fitted on the same split (their directions and sigmas are REAL's).
    ``select`` turns it into a :class:`REAL` steerer."""

    probes: HeadProbes
    relevance: dict[str, torch.Tensor]  # scorer -> [n_layers, n_heads] validation ROC-AUC
    recon: torch.Tensor  # [n_layers, n_heads]: the autoencoders' reconstruction MSE (standardized units)
    perplexity: torch.Tensor  # [n_layers, n_heads]: codebook perplexity (of C codes)
    codes: torch.Tensor  # [n_layers, n_heads, N, U] uint8: every answer's code ids (fit then validation rows)
    labels: torch.Tensor  # [N]: 1 = true answer
    seconds: dict[str, float] = field(default_factory=dict)  # autoencoders, codes, each scorer
    settings: dict = field(default_factory=dict)
    fitted_on: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, model: Model, questions: Sequence[MCQuestion], val_questions: Sequence[MCQuestion] | None = None,
            template: str = TEMPLATE, acts: torch.Tensor | None = None, scorers: Sequence[str] = (DEFAULT_SCORER,),
            probes: HeadProbes | None = None, val_fraction: float = 0.2, seed: int = 42, batch_size: int = 16,
            gru_epochs: int = 6, progress: bool | None = None, **vq_settings) -> HeadRelevance:
        """Collect head activations (or take ``acts`` [N, L, H, d_head] in ``qa_examples``
        order of ``questions`` then ``val_questions``), fit ITI's probes (or take ``probes``
        fitted on the same rows), train an autoencoder per head on the probes' training
        answers and score relevance on their validation answers.

        ``scorers``: the relevance scorers to run (default the probe; ``SCORERS`` for both;
        ``add_scorer`` adds one later from the stored codes). ``vq_settings``: keyword
        arguments of :func:`train_vqae` (units, codebook, epochs, relevant_units, ...).
        """
        _check_scorers(scorers)
        if not questions:
            raise ValueError("REAL needs at least one training question")
        every = list(questions) + list(val_questions or [])
        texts, labels, _ = qa_examples(every, template)
        if acts is None:
            acts = collect_heads(model, texts, batch_size=batch_size, progress=progress)
        if probes is None:
            probes = HeadProbes.fit(model, questions, val_questions, template=template, val_fraction=val_fraction,
                                    seed=seed, acts=acts)
        elif probes.info.get("questions_hash") != questions_hash(every):
            raise ValueError("probes were fitted on other questions than these; pass probes fitted on the same ones")
        L, H = probes.grid.sites_shape
        y = torch.as_tensor(labels).long()
        flat = acts.reshape(acts.shape[0], L * H, -1)
        relevance, vq, codes, seconds = module_relevance(
            flat, y, probes.grid.train_idx, probes.grid.val_idx, scorers=scorers,
            gru_epochs=gru_epochs, seed=seed, progress=progress, **vq_settings)
        C = vq.model.codebook
        relevance = {k: v.view(L, H) for k, v in relevance.items()}
        tr, va = probes.grid.train_idx, probes.grid.val_idx
        settings = {"units": vq.model.units, "code_dim": vq.model.code_dim, "codebook": C,
                    "gru_epochs": gru_epochs, "seed": seed, **vq_settings}
        codes = codes.to(torch.uint8 if C <= 256 else torch.int32).view(L, H, *codes.shape[1:])
        return cls(probes=probes, relevance=relevance, recon=vq.recon.view(L, H), perplexity=vq.perplexity.view(L, H),
                   codes=codes, labels=y, seconds=seconds, settings=settings,
                   fitted_on=model.fingerprint(), info={**probes.info, "n_fit_answers": len(tr), "n_val_answers": len(va)})

    def add_scorer(self, scorer: str, progress: bool | None = None) -> torch.Tensor:
        """The relevance of ``scorer``, computed from the stored codes if this fit lacks it
        (the autoencoders are not retrained)."""
        if scorer not in self.relevance:
            _check_scorers([scorer])
            L, H = self.codes.shape[:2]
            t0 = time.perf_counter()
            rel = score_codes(self.codes.reshape(L * H, *self.codes.shape[2:]), self.labels, self.probes.grid.train_idx,
                              self.probes.grid.val_idx, scorer, int(self.settings["codebook"]),
                              gru_epochs=int(self.settings.get("gru_epochs", 6)), seed=int(self.settings.get("seed", 0)),
                              progress=progress)
            self.relevance[scorer] = rel.view(L, H)
            self.seconds[scorer] = time.perf_counter() - t0
        return self.relevance[scorer]

    @property
    def scorers(self) -> list[str]:
        return list(self.relevance)

    def resolve_scorer(self, scorer: str | None = None) -> str:
        """``scorer``, or the default one when None; refuses a scorer this fit lacks."""
        scorer = scorer or (DEFAULT_SCORER if DEFAULT_SCORER in self.relevance else self.scorers[0])
        if scorer not in self.relevance:
            raise ValueError(f"no relevance from scorer {scorer!r}; this fit has {self.scorers}")
        return scorer

    def ranking(self, scorer: str | None = None) -> list[tuple[int, int]]:
        """All heads, most relevant first (ties: the lower layer, then head)."""
        rel = self.relevance[self.resolve_scorer(scorer)]
        H = rel.shape[1]
        vals = rel.reshape(-1).tolist()
        order = sorted(range(len(vals)), key=lambda i: (-vals[i], i))
        return [(i // H, i % H) for i in order]

    def rank_correlation(self, scorer: str | None = None) -> float:
        """Spearman correlation over all heads of the relevance with ITI's probe validation accuracy."""
        from scipy.stats import spearmanr

        rel = self.relevance[self.resolve_scorer(scorer)].reshape(-1).numpy()
        acc = self.probes.grid.val_acc.reshape(-1).numpy()
        return float(spearmanr(rel, acc).statistic)

    def overlap(self, k: int, scorer: str | None = None) -> float:
        """Share of REAL's top ``k`` heads that are also among ITI's top ``k``."""
        return len(set(self.ranking(scorer)[:k]) & set(self.probes.ranking()[:k])) / k

    def select(self, k: int, alpha: float = 15.0, scorer: str | None = None, weighting: str = "auc",
               direction: str = "mass_mean") -> REAL:
        """REAL on the ``k`` most relevant heads at strength ``alpha``; ``weighting="none"``
        gives every head weight 1 (ITI's steering on REAL's heads)."""
        scorer = self.resolve_scorer(scorer)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        n = self.relevance[scorer].numel()
        if not 1 <= k <= n:
            raise ValueError(f"k must be between 1 and {n} heads, got {k}")
        heads = self.ranking(scorer)[:k]
        iti = self.probes.select(n, alpha, direction)  # every head's direction and sigma, in ITI's order
        where = {h: i for i, h in enumerate(iti.head_list())}
        rows = torch.tensor([where[h] for h in heads])
        rel = torch.stack([self.relevance[scorer][layer, h] for layer, h in heads])
        weight = rel / rel.max() if weighting == "auc" else torch.ones(k)
        return REAL(heads=torch.tensor(heads), directions=iti.directions[rows], sigma=iti.sigma[rows],
                    strength=float(alpha), relevance=rel.float(), weight=weight.float(), scorer=scorer,
                    weighting=weighting, direction=direction, fitted_on=self.fitted_on,
                    info={**self.info, "settings": self.settings})


@dataclass
class REAL(HeadShift):
    """REAL: a :class:`HeadShift` on the K most relevant heads, head h shifted by
    ``strength * weight_h * sigma_h * u_h`` (weight = relevance / max relevance)."""

    relevance: torch.Tensor | None = None  # [K]: each head's validation ROC-AUC
    weight: torch.Tensor | None = None  # [K]
    scorer: str = DEFAULT_SCORER
    weighting: str = "auc"
    direction: str = "mass_mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight is None:
            self.weight = torch.ones(self.k)
        if tuple(self.weight.shape) != (self.k,):
            raise ValueError(f"weight must have shape [{self.k}], got {tuple(self.weight.shape)}")
        if not torch.isfinite(self.weight).all():
            raise ValueError("REAL weight contain NaN or inf; refit from clean data")
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")

    def shift(self) -> torch.Tensor:
        assert self.weight is not None
        return (self.weight * self.sigma)[:, None] * self.directions

    def describe(self) -> str:
        return f"REAL(K={self.k}, alpha={self.strength:g}, {self.scorer})"


def relevance_table(rel: HeadRelevance, k: int = 10) -> list[dict]:
    """The ``k`` most relevant heads of each scorer next to their ITI probe accuracy."""
    acc = rel.probes.grid.val_acc
    rows = []
    for scorer in rel.scorers:
        for rank, (layer, h) in enumerate(rel.ranking(scorer)[:k]):
            rows.append({"scorer": scorer, "rank": rank + 1, "layer": layer, "head": h,
                         "relevance": float(rel.relevance[scorer][layer, h]), "iti_val_acc": float(acc[layer, h])})
    return rows


__all__ = ["REAL", "HeadRelevance", "VQAutoencoders", "GRUPriors", "train_vqae", "train_priors", "prior_scores",
           "supervised_contrastive", "code_probe_auc", "fit_code_probes", "module_relevance", "relevance_table", "SCORERS"]
