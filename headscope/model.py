"""HeadModel: a Hugging Face model plus its head geometry; owns every hook headscope installs.

Probes and edits are context managers. Hooks are installed on entry and removed in ``finally``,
so a model is never left edited, also after an exception::

    hm = HeadModel.load("retrieval")                       # organism, local path or hub id
    with hm.attention_stats(["top1"], query_rows=(10, 12)) as rec:
        hm.model(input_ids)
    rec.top1_index()                                       # [layers, B, heads, rows]
    with hm.ablate([(1, 3), (2, 0)], mode="zero"):
        hm.model.generate(input_ids)

Each block applies only where it was opened (headscope.scope): to the forward passes of its own
thread and asyncio task (tasks created inside it inherit it), and, when a generator's body opens
it, only to the generator's own forward passes, never to its caller's between items.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from headscope import cache, probes, scope
from headscope.errors import HeadscopeError
from headscope.heads import as_heads, format_heads, head_masks
from headscope.hf import attention, devices, loading
from headscope.hf.adapters import find_layers, in_features, residual_input
from headscope.organisms import organism_path
from headscope.probes import StatsRecording, StatsRequest, ZCapture  # noqa: F401  public names of HeadModel's probes
from headscope.validate import check_device, check_dtype, check_model_folder

Head = tuple[int, int]


@dataclass(frozen=True)
class HeadGeometry:
    n_layers: int
    n_heads: int  # query heads per layer
    n_kv_heads: int
    head_dim: int
    d_model: int
    max_positions: int | None
    causal: bool

    @property
    def n_total(self) -> int:
        return self.n_layers * self.n_heads


# The hook table: every hook HeadModel installs, by kind. The handlers read the lists; kinds with a
# module hook get it put on at their first use within an install (an idle forward pre-hook still
# costs every call of its module, and decoding makes thousands).
HOOK_KINDS = (
    "q_scale",         # (layer, [H] or [B, H] multiplier, or fn(positions) -> one) on the queries
    "attention_tap",   # fn(layer, query, key, value, mask, scaling, module, kwargs), read only
    "attention_edit",  # fn(layer, module, q, k, v, mask, scaling, **kw) -> output [B, q, H, d] or None
    "z_capture",       # ZCapture: per-head z at the o_proj input
    "z_edit",          # fn(layer, z [B, S, H, d], positions) -> z
    "residual",        # fn(layer, hidden [B, S, d]) at each block's input
    "input",           # fn(kwargs) with the keyword inputs of each forward call of the model
    "module",          # a torch hook handle on any module (hook_module), removed with the rest
)
MODULE_HOOK = {"z_capture": "out_proj", "z_edit": "out_proj", "residual": "block", "input": "input"}


# ------------------------------------------------------------------------------------- model
class HeadModel:
    """A transformers model with its head geometry; probes and edits per (layer, head)."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, name: str | None = None, processor=None):
        if tokenizer is None and type(model).__module__.startswith("nnsight"):
            tokenizer = getattr(model, "tokenizer", None)
        model = _unwrap_nnsight(model)
        if not hasattr(model, "config") or not hasattr(model, "set_attn_implementation"):
            raise HeadscopeError(
                f"HeadModel needs a transformers PreTrainedModel; got {type(model).__name__}. "
                "Load one with HeadModel.load(path_or_hub_id)."
            )
        self.model = model
        self.processor = processor  # image-text models: the processor (images + text -> inputs)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        self.name = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self.adapter, self._layers = find_layers(model)
        self.layer_names = [lm.name for lm in self._layers]  # e.g. "model.decoder.layers.0.encoder_attn"
        self._rows_from = _row_partners(self._layers)
        self.geometry = self._read_geometry()
        self._depth = 0
        self._owner: int | None = None  # the thread whose probes and edits are open (one at a time)
        self._owner_lock = threading.Lock()
        self._undo_attention: Callable[[], None] | None = None
        self._hooks: dict[str, list] = {kind: [] for kind in HOOK_KINDS}  # the hook table
        self._open: list[scope.Opened] = []  # its open entries, and where each applies (headscope.scope)
        self._handles: list = []  # torch handles of the module hooks the table's kinds put on
        self._module_hooks: set[str] = set()  # module hooks on now ("out_proj", "block", "input")
        self._stats: StatsRequest | None = None
        self._positions: dict[int, range] = {}  # layer -> absolute positions of the current call

    # --------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, name_or_path: str | os.PathLike, *, device: str | None = None, dtype="float32",
             device_map=None, max_memory: dict | None = None, offload_folder: str | None = None, **kwargs):
        """Load a shipped organism (``headscope models``), a local folder or a hub id.

        The auto class is the one whose mapping holds the config's architecture (causal LMs:
        AutoModelForCausalLM; LLaVA-style: AutoModelForImageTextToText, with their processor, PIL
        image backend when torchvision is missing; T5/BART: AutoModelForSeq2SeqLM); other models
        load through AutoModel. ``kwargs`` go to ``from_pretrained`` (``attn_implementation``
        defaults to ``"sdpa"``). ``device_map`` ("auto" or ``{"module": device}``, devices may be
        "cpu" or "disk") and ``max_memory`` split the model over devices with accelerate; offloaded
        weights go to ``offload_folder`` (default: a temp folder).
        """
        torch_dtype, device = check_dtype(dtype), check_device(device)
        source = str(name_or_path)
        organism = organism_path(source)
        if organism is not None:
            source = str(organism)
        elif Path(source).exists():
            check_model_folder(Path(source))
        model, tokenizer, processor = loading.load_pretrained(
            source, dtype=torch_dtype, device=device, device_map=device_map, max_memory=max_memory,
            offload_folder=offload_folder, **kwargs)
        return cls(model, tokenizer, name=str(name_or_path), processor=processor)

    def _read_geometry(self) -> HeadGeometry:
        text = loading.text_config(self.model.config)
        n_heads = int(text.num_attention_heads)
        d_model = int(text.hidden_size)
        # z's width per head: the output projection's input over the heads (MLA: the value head dim)
        head_dim = in_features(self._layers[0].out_proj) // n_heads
        n_kv = int(getattr(text, "num_key_value_heads", None) or getattr(text, "num_kv_heads", None) or n_heads)
        attention = self._layers[0].attention
        return HeadGeometry(
            n_layers=len(self._layers),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=int(head_dim),
            d_model=d_model,
            max_positions=getattr(text, "max_position_embeddings", None),
            causal=bool(getattr(attention, "is_causal", False)),
        )

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device the input embeddings run on (split models: the first block's)."""
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        return devices.execution_device(embeddings if embeddings is not None else self.model)

    def __repr__(self) -> str:
        g = self.geometry
        return (
            f"HeadModel({self.name!r}, {type(self.model).__name__}: {g.n_layers} layers x {g.n_heads} heads "
            f"({g.n_kv_heads} kv), head_dim {g.head_dim})"
        )

    # --------------------------------------------------------------------------- heads
    def check_heads(self, heads: str | Iterable[Sequence[int] | str]) -> list[Head]:
        """Validate heads: (layer, head) pairs or names (``"L1H5, 1.4"``, see headscope.heads);
        a clear error names the bad ones and the valid ranges."""
        g = self.geometry
        out = as_heads(heads)
        bad = [h for h in out if not (0 <= h[0] < g.n_layers and 0 <= h[1] < g.n_heads)]
        if bad:
            raise HeadscopeError(
                f"invalid head(s) {format_heads(bad)}: this model has layers 0..{g.n_layers - 1} and heads "
                f"0..{g.n_heads - 1}"
            )
        return out

    def stack_layers(self, stack: str) -> list[int]:
        """Layer indices of one attention stack of an encoder-decoder: "encoder", "decoder" or "cross"."""
        stacks = sorted({lm.stack for lm in self._layers if lm.stack})
        if stack not in stacks:
            raise HeadscopeError(
                f"{type(self.model).__name__} has no attention stack {stack!r}; "
                + (f"choose from {stacks}" if stacks else "it has a single stack (all layers)")
            )
        return [i for i, lm in enumerate(self._layers) if lm.stack == stack]

    def all_heads(self) -> list[Head]:
        return [(layer, head) for layer in range(self.geometry.n_layers) for head in range(self.geometry.n_heads)]

    # --------------------------------------------------------------------------- hook plumbing
    @contextlib.contextmanager
    def _hooked(self) -> Iterator[None]:
        """Install headscope's attention function and o_proj hooks for the block's duration.

        Probes and edits belong to one thread at a time: another thread opening one meanwhile gets
        an error at once, and its plain forward passes run unedited (the hooks pass them through).
        Within the thread, each applies only where it was opened (headscope.scope): its own asyncio
        task (and tasks created inside the block), or the generator body that opened it.
        """
        with self._owner_lock:
            if self._owner not in (None, threading.get_ident()):
                raise HeadscopeError(
                    "another thread has probes or edits open on this HeadModel; they apply to one thread at a "
                    "time. Give each thread its own HeadModel, or hold a lock around each with-block"
                )
            if self._depth == 0:
                self._install()
            self._owner = threading.get_ident()
            self._depth += 1
        try:
            yield
        finally:
            with self._owner_lock:
                self._depth -= 1
                if self._depth == 0:
                    self._owner = None
                    self._uninstall()

    def _mine(self) -> bool:
        """True in the thread whose probes and edits are open (hooks ignore other threads)."""
        return self._owner == threading.get_ident()

    def _applying(self) -> dict[str, list]:
        """The hook table's items that apply to the forward pass running now, by kind, in the order
        they were opened: those opened in this thread and context, or by the generator body that
        runs now (headscope.scope)."""
        now: dict[str, list] = {}
        if self._open and self._mine():
            for record in scope.active(self._open):
                now.setdefault(record.kind, []).append(record.item)
        return now

    def _install(self) -> None:
        if getattr(next(self.model.parameters(), None), "is_meta", False):
            raise HeadscopeError(
                f"{type(self.model).__name__} has parameters on the meta device (no weights loaded): headscope's hooks "
                "would sit on modules that never run. Load the weights first (HeadModel.load(path); for an nnsight "
                "model, HeadModel(lm) dispatches it)."
            )
        try:
            self._undo_attention = attention.use_headscope_attention(self.model, self.adapter, self._layers)
            for layer, modules in enumerate(self._layers):
                attention.set_handler(modules.attention, self._attention_handler(layer))
        except BaseException:
            self._uninstall()
            raise

    def _module_hooks_for(self, kind: str) -> None:
        """Put on the module hooks that a kind of the table needs, once per install."""
        module_hook = MODULE_HOOK.get(kind)
        if module_hook is None or module_hook in self._module_hooks:
            return
        self._module_hooks.add(module_hook)
        if module_hook == "input":
            self._handles.append(self.model.register_forward_pre_hook(self._input_hook, with_kwargs=True))
        for layer, modules in enumerate(self._layers):
            if module_hook == "out_proj":
                self._handles.append(modules.out_proj.register_forward_pre_hook(self._out_proj_hook(layer)))
            elif module_hook == "block" and modules.block is not None:
                self._handles.append(modules.block.register_forward_pre_hook(
                    self._block_hook(layer), with_kwargs=True))

    def _uninstall(self) -> None:
        for handle in self._handles + self._hooks["module"]:
            handle.remove()
        self._handles.clear()
        self._hooks["module"].clear()
        self._module_hooks.clear()
        for modules in self._layers:
            attention.set_handler(modules.attention, None)
        if self._undo_attention is not None:
            self._undo_attention()
            self._undo_attention = None

    def hooks_installed(self) -> bool:
        """True while any headscope hook is on the model (for tests and sanity checks)."""
        return bool(self._handles) or any(attention.has_handler(m.attention) for m in self._layers)

    @contextlib.contextmanager
    def _pushed(self, kind: str, item) -> Iterator:
        """Enter ``item`` in the hook table under ``kind`` for the block's duration."""
        with self._hooked():
            self._module_hooks_for(kind)
            self._hooks[kind].append(item)
            try:
                with scope.opened(self._open, kind, item):
                    yield item
            finally:
                self._hooks[kind].remove(item)

    @contextlib.contextmanager
    def hook_module(self, module: torch.nn.Module, hook: Callable, *, pre: bool = False,
                    with_kwargs: bool = False) -> Iterator[None]:
        """A plain torch forward hook (``pre``: forward pre-hook) on any module of the model, kept in the
        hook table: removed on exit, also after an exception, or when the last probe or edit closes.
        Like every entry of the table, it is called only where it was opened (headscope.scope)."""
        with self._hooked(), scope.opened(self._open, "module", hook) as record:
            def scoped(*args, **kwargs):
                return hook(*args, **kwargs) if self._mine() and scope.active([record]) else None

            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            handle = register(scoped, with_kwargs=with_kwargs)
            self._hooks["module"].append(handle)
            try:
                yield
            finally:
                handle.remove()
                if handle in self._hooks["module"]:
                    self._hooks["module"].remove(handle)

    # --------------------------------------------------------------------------- handlers
    def _attention_handler(self, layer: int):
        def handler(module, query, key, value, mask, scaling, **kwargs):
            if not self._mine():
                return None
            now = self._applying()
            n_q, n_k = query.shape[2], key.shape[2]
            partner = self._rows_from.get(layer)  # cross-attention rows are its decoder block's rows
            start = self._positions[partner].start if partner in self._positions else n_k - n_q
            self._positions[layer] = range(start, start + n_q)  # absolute rows of this call
            for tap in now.get("attention_tap", ()):  # read-only observers (headscope.cache)
                tap(layer, query, key, value, mask, scaling, module, kwargs)
            scales = [s for l_, s in now.get("q_scale", ()) if l_ == layer]
            for s in scales:  # [H], [B, H] per batch row, or fn(positions) -> [H], [B, H] or [B, H, rows, 1]
                s = s(self._positions[layer]) if callable(s) else s
                s = s.to(device=query.device, dtype=query.dtype)
                query = query * (s.view(1, -1, 1, 1) if s.dim() == 1 else s if s.dim() == 4 else s.view(*s.shape, 1, 1))
            request = now.get("stats", [None])[0]
            if request is None or layer not in request.layers:
                for edit in now.get("attention_edit", ()):
                    out = edit(layer, module, query, key, value, mask, scaling, **kwargs)
                    if out is not None:
                        return out
                return attention.stock_attention(module, query, key, value, mask, scaling, **kwargs) if scales else None
            return probes.record_attention(request, layer, self._positions[layer].start, module, query, key, value,
                                           mask, scaling, **kwargs)

        return handler

    def _block_hook(self, layer: int):
        def hook(module, args, kwargs):
            watchers = self._applying().get("residual")
            if watchers:
                hidden = residual_input(args, kwargs)
                for watch in watchers:
                    watch(layer, hidden)
            return None

        return hook

    def _input_hook(self, module, args, kwargs):
        watchers = self._applying().get("input")
        if watchers:
            inputs = dict(kwargs, input_ids=args[0]) if args else kwargs
            for watch in watchers:
                watch(inputs)
        return None

    def _out_proj_hook(self, layer: int):
        g = self.geometry

        def hook(module, args):
            now = self._applying()
            edits, captures = now.get("z_edit"), now.get("z_capture", ())
            if not edits and not captures:
                return None
            z = args[0]
            zh = z.view(*z.shape[:-1], g.n_heads, g.head_dim)
            for capture in captures:
                capture.take(layer, zh)
            if not edits:
                return None
            positions = self._positions.get(layer, range(zh.shape[1]))
            if len(positions) != zh.shape[1]:
                positions = range(zh.shape[1])
            for edit in edits:
                zh = edit(layer, zh, positions)
            return (zh.reshape(z.shape),) + tuple(args[1:])

        return hook

    # --------------------------------------------------------------------------- public probes
    @contextlib.contextmanager
    def attention_stats(
        self,
        outputs: Sequence[str] = ("top1",),
        *,
        layers: Iterable[int] | None = None,
        key_groups: torch.Tensor | None = None,
        num_groups: int = 0,
        query_rows: tuple[int, int] | None = None,
        match_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Iterator[StatsRecording]:
        """Record per-head attention statistics without the [H, N, N] pattern.

        ``outputs``: any of "top1" (top1_index, top1_weight), "group_mass", "lse", "entropy",
        "received" (attention each key receives, summed over the recorded query rows: [B, H, Nk]),
        "match_mass" (mass on keys whose match id equals the query's: [B, H, rows, C]).
        ``key_groups``: [B, N] (or [N]) group id per key position, -1 = none (e.g. 0 on the needle
        span). ``query_rows``: absolute positions [start, stop) to record (default: all rows).
        ``match_ids``: (key ids, query ids), each [C, B, N] over absolute positions; ids < 0 never
        match (e.g. previous-token: key id = position, query id = position - 1).
        """
        with self._hooked():
            with self._recording(outputs, layers, key_groups, num_groups, query_rows, match_ids) as recording:
                yield recording

    @contextlib.contextmanager
    def _recording(self, outputs, layers, key_groups, num_groups, query_rows, match_ids) -> Iterator[StatsRecording]:
        if self._stats is not None:
            raise HeadscopeError("attention_stats blocks cannot be nested; close the open one first")
        request = probes.stats_request(outputs, layers, key_groups, num_groups, query_rows, match_ids,
                                       self.geometry.n_layers)
        self._stats = request
        try:
            with scope.opened(self._open, "stats", request):
                yield StatsRecording(request, self.geometry.n_layers)
        finally:
            self._stats = None
        probes.check_recorded(request, type(self.model).__name__)

    @contextlib.contextmanager
    def capture_z(self, layers: Iterable[int] | None = None, positions="all") -> Iterator[ZCapture]:
        """Capture each head's output z (the o_proj input) as [B, positions, H, d_head].

        ``positions``: "all", "last", an int, a slice or a list of ints.
        """
        layers = range(self.geometry.n_layers) if layers is None else layers
        with self._pushed("z_capture", ZCapture(layers, positions)) as capture:
            yield capture

    @contextlib.contextmanager
    def tap_attention(self, tap: Callable) -> Iterator[None]:
        """Call ``tap(layer, query, key, value, mask, scaling, module, kwargs)`` with the tensors each
        layer's attention function receives (q after RoPE [B, H, q, d]; k, v [B, Hkv, k, d]); read only."""
        with self._pushed("attention_tap", tap):
            yield

    def run_with_cache(self, input_ids, **kwargs):
        """``(logits, cache)`` under TransformerLens hook names (``blocks.L.attn.hook_z``, ...); see
        :func:`headscope.cache.run_with_cache`."""
        return cache.run_with_cache(self, input_ids, **kwargs)

    # --------------------------------------------------------------------------- edits
    @contextlib.contextmanager
    def edit_z(self, edit: Callable[[int, torch.Tensor, range], torch.Tensor]) -> Iterator[None]:
        """Apply ``edit(layer, z, positions)`` to the per-head outputs z [B, S, H, d] of every layer.

        ``positions`` are the absolute positions of z's S rows in this call (with a KV cache, a
        decode step's single row sits at the cache length), so edits can tell prefill from decode.
        The edit must return a new tensor (no in-place change), which keeps it differentiable.
        """
        with self._pushed("z_edit", edit):
            yield

    @contextlib.contextmanager
    def edit_attention(self, edit: Callable) -> Iterator[None]:
        """Replace attention outputs: ``edit(layer, module, q, k, v, mask, scaling, **kwargs)`` returns
        the output [B, q, H, d] or None (stock attention). q after RoPE [B, H, q, d]; k, v [B, Hkv, k, d]."""
        with self._pushed("attention_edit", edit):
            yield

    @contextlib.contextmanager
    def watch_residual(self, watch: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
        """Call ``watch(layer, hidden)`` with each layer's residual-stream input [B, S, d] (no edits)."""
        with self._pushed("residual", watch):
            yield

    @contextlib.contextmanager
    def watch_inputs(self, watch: Callable[[dict], None]) -> Iterator[None]:
        """Call ``watch(kwargs)`` with the keyword inputs of every forward call of the model
        (``input_ids``, ``attention_mask``, ... as generate() passes them)."""
        with self._pushed("input", watch):
            yield

    @contextlib.contextmanager
    def scale_queries(self, layer: int, scale: torch.Tensor) -> Iterator[None]:
        """Multiply one layer's queries per head by ``scale`` ([H], or [B, H] per batch row).

        0 gives uniform attention over the allowed keys; a small eps is the Ships ablation.
        RoPE is linear, so scaling q after RoPE equals scaling it before.
        """
        with self._pushed("q_scale", (layer, scale)):
            yield

    @contextlib.contextmanager
    def ablate(self, heads: Iterable[Sequence[int]], mode: str = "zero") -> Iterator[None]:
        """Ablate heads: ``zero`` their output z, or give them ``uniform`` attention (query = 0)."""
        heads = self.check_heads(heads)
        if mode not in ("zero", "uniform"):
            raise HeadscopeError(f"unknown ablation mode {mode!r}; choose 'zero' or 'uniform'")
        masks = head_masks(heads, self.geometry.n_layers, self.geometry.n_heads)
        with contextlib.ExitStack() as stack:
            if mode == "zero":

                def zero(layer: int, z: torch.Tensor, positions: range) -> torch.Tensor:
                    keep = (~masks[layer]).to(device=z.device, dtype=z.dtype)
                    return z * keep.view(1, 1, -1, 1) if masks[layer].any() else z

                stack.enter_context(self.edit_z(zero))
            else:
                for layer in sorted({layer for layer, _ in heads}):
                    stack.enter_context(self.scale_queries(layer, (~masks[layer]).float()))
            with self._hooked():
                yield


def _unwrap_nnsight(model):
    """The HF model inside an nnsight model; a lazy one (built on the meta device, the default of
    ``LanguageModel(path)``) is dispatched first, so the hooks bind to the module that will run."""
    if not type(model).__module__.startswith("nnsight"):
        return model
    if getattr(model, "dispatched", True) is False:
        model.dispatch()  # nnsight would load the real weights at the first trace, into a new module
    inner = model.__dict__.get("_module")
    return inner if inner is not None else getattr(model, "_model", model)


def _row_partners(layers: list) -> dict[int, int]:
    """Cross-attention layer -> the decoder self-attention layer of its block, whose rows it shares."""
    self_attn = {lm.block_path: i for i, lm in enumerate(layers) if lm.stack == "decoder"}
    return {
        i: self_attn[lm.block_path] for i, lm in enumerate(layers) if lm.stack == "cross" and lm.block_path in self_attn
    }
