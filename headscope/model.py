"""HeadModel: a Hugging Face model plus its head geometry; owns every hook headscope installs.

Probes and edits are context managers. Hooks are installed on entry and removed in ``finally``,
so a model is never left edited, also after an exception::

    hm = HeadModel.load("retrieval")                       # organism, local path or hub id
    with hm.attention_stats(["top1"], query_rows=(10, 12)) as rec:
        hm.model(input_ids)
    rec.top1_index()                                       # [layers, B, heads, rows]
    with hm.ablate([(1, 3), (2, 0)], mode="zero"):
        hm.model.generate(input_ids)
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from headscope import devices, hooks
from headscope.errors import HeadscopeError
from headscope.heads import as_heads, format_heads

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


# ------------------------------------------------------------------------------------- probes
@dataclass
class StatsRequest:
    """What the attention function records while an ``attention_stats`` block is open."""

    outputs: tuple[str, ...]
    layers: frozenset[int]
    key_groups: torch.Tensor | None  # [B, N] group id per absolute key position, -1 = none
    num_groups: int
    query_rows: tuple[int, int] | None  # absolute query positions [start, stop); None = all
    match_ids: tuple[torch.Tensor, torch.Tensor] | None = None  # key ids, query ids: [C, B, N] each
    calls: dict[int, list[tuple[int, object]]] = field(default_factory=dict)  # layer -> [(abs row 0, stats)]


class StatsRecording:
    """Attention statistics per layer and forward call (a decode loop makes one call per step)."""

    def __init__(self, request: StatsRequest, n_layers: int):
        self._request = request
        self.layers = sorted(request.layers)
        self._n_layers = n_layers

    @property
    def n_calls(self) -> int:
        return min((len(self._request.calls.get(layer, [])) for layer in self.layers), default=0)

    def call(self, index: int = -1) -> dict[int, object]:
        """``{layer: AttentionStats}`` of one forward call (default: the last)."""
        return {layer: self._request.calls[layer][index][1] for layer in self.layers}

    def row_start(self, index: int = -1) -> int:
        """Absolute position of the first recorded query row in that call."""
        return self._request.calls[self.layers[0]][index][0]

    def stacked(self, name: str, index: int = -1) -> torch.Tensor:
        """One statistic of one call, stacked over layers: [L, B, H, rows, ...]."""
        return torch.stack([getattr(self._request.calls[layer][index][1], name) for layer in self.layers])

    def top1_index(self, index: int = -1) -> torch.Tensor:
        return self.stacked("top1_index", index)

    def group_mass(self, index: int = -1) -> torch.Tensor:
        return self.stacked("group_mass", index)


class ZCapture:
    """Per-head outputs z ([B, positions, H, d_head]) per layer, from the last forward call."""

    def __init__(self, layers: Iterable[int], positions):
        self.layers = sorted(layers)
        self.positions = positions
        self.z: dict[int, torch.Tensor] = {}


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
        self.adapter, self._layers = hooks.find_layers(model)
        self.layer_names = [lm.name for lm in self._layers]  # e.g. "model.decoder.layers.0.encoder_attn"
        self._rows_from = _row_partners(self._layers)
        self.geometry = self._read_geometry()
        self._depth = 0
        self._owner: int | None = None  # the thread whose probes and edits are open (one at a time)
        self._owner_lock = threading.Lock()
        self._undo_attention: Callable[[], None] | None = None
        self._hook_handles: list = []
        self._module_hooks: set[str] = set()  # kinds of module hooks on now (see _module_hooks_for)
        self._q_scales: list[tuple[int, torch.Tensor]] = []  # (layer, [H] query multiplier)
        self._z_edits: list[Callable[[int, torch.Tensor, range], torch.Tensor]] = []
        self._z_captures: list[ZCapture] = []
        self._attention_edits: list[Callable] = []  # fn(layer, module, q, k, v, mask, scaling, **kw) -> out | None
        self._residual_watchers: list[Callable[[int, torch.Tensor], None]] = []
        self._input_watchers: list[Callable[[dict], None]] = []
        self._attention_taps: list[Callable] = []  # fn(layer, query, key, value, mask, scaling, module, kwargs)
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
        from transformers import AutoConfig, AutoTokenizer

        from headscope import zoo
        from headscope.validate import check_device, check_dtype, check_model_folder

        torch_dtype, device = check_dtype(dtype), check_device(device)
        source = str(name_or_path)
        organism = zoo.organism_path(source)
        if organism is not None:
            source = str(organism)
        elif Path(source).exists():
            check_model_folder(Path(source))
        try:
            config = AutoConfig.from_pretrained(source)
        except (ValueError, KeyError) as exc:  # a readable config.json transformers cannot use
            raise HeadscopeError(f"{source}/config.json is not a config transformers can load ({exc})") from None
        except OSError as exc:
            raise HeadscopeError(
                f"could not load {source!r}: it is not a local model folder, not a shipped organism "
                f"({', '.join(zoo.ORGANISMS)}), and it could not be fetched from the Hugging Face hub "
                f"({type(exc).__name__}; offline={os.environ.get('HF_HUB_OFFLINE', '0')}). Download it on a "
                "machine with network access (huggingface-cli download ID --local-dir DIR) and pass the "
                "local folder, e.g. --model ./DIR"
            ) from None
        auto = _auto_class(config)
        # SDPA cannot softcap attention logits (Gemma 2): such models run eager outside headscope's hooks
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        kwargs.setdefault("attn_implementation", "eager" if getattr(text, "attn_logit_softcapping", None) else "sdpa")
        if device_map is not None or max_memory is not None:
            if device is not None:
                raise HeadscopeError("give either device (one device) or device_map / max_memory (split over devices), not both")
            import tempfile

            kwargs.update(device_map=device_map or "auto", max_memory=max_memory,
                          offload_folder=offload_folder or tempfile.mkdtemp(prefix="headscope-offload-"))
        try:
            with _no_loading_bars():
                model = auto.from_pretrained(source, dtype=torch_dtype, **kwargs)
        except (ValueError, KeyError) as exc:
            if "device_map" not in kwargs:
                raise
            raise HeadscopeError(f"could not split {source!r} over devices with device_map={kwargs['device_map']!r}: "
                                 f"{exc}") from None
        model.eval()
        if device is not None:
            model.to(device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError):
            tokenizer = None
        return cls(model, tokenizer, name=str(name_or_path), processor=_load_processor(source, config))

    def _read_geometry(self) -> HeadGeometry:
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_heads = int(text.num_attention_heads)
        d_model = int(text.hidden_size)
        # z's width per head: the output projection's input over the heads (MLA: the value head dim)
        head_dim = _in_features(self._layers[0].out_proj) // n_heads
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

    def _install(self) -> None:
        if getattr(next(self.model.parameters(), None), "is_meta", False):
            raise HeadscopeError(
                f"{type(self.model).__name__} has parameters on the meta device (no weights loaded): headscope's hooks "
                "would sit on modules that never run. Load the weights first (HeadModel.load(path); for an nnsight "
                "model, HeadModel(lm) dispatches it)."
            )
        try:
            self._undo_attention = hooks.use_headscope_attention(self.model, self.adapter, self._layers)
            for layer, modules in enumerate(self._layers):
                hooks.set_handler(modules.attention, self._attention_handler(layer))
        except BaseException:
            self._uninstall()
            raise

    def _module_hooks_for(self, stack: list) -> None:
        """Put on the module hooks that ``stack``'s probes or edits need, once per install: an idle
        forward pre-hook still costs every call of its module (decoding runs thousands)."""
        kind = ("out_proj" if stack is self._z_edits or stack is self._z_captures else
                "block" if stack is self._residual_watchers else "input" if stack is self._input_watchers else None)
        if kind is None or kind in self._module_hooks:
            return
        self._module_hooks.add(kind)
        if kind == "input":
            self._hook_handles.append(self.model.register_forward_pre_hook(self._input_hook, with_kwargs=True))
        for layer, modules in enumerate(self._layers):
            if kind == "out_proj":
                self._hook_handles.append(modules.out_proj.register_forward_pre_hook(self._out_proj_hook(layer)))
            elif kind == "block" and modules.block is not None:
                self._hook_handles.append(modules.block.register_forward_pre_hook(
                    self._block_hook(layer), with_kwargs=True))

    def _uninstall(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        self._module_hooks.clear()
        for modules in self._layers:
            hooks.set_handler(modules.attention, None)
        if self._undo_attention is not None:
            self._undo_attention()
            self._undo_attention = None

    def hooks_installed(self) -> bool:
        """True while any headscope hook is on the model (for tests and sanity checks)."""
        return bool(self._hook_handles) or any(m.attention in hooks._HANDLERS for m in self._layers)

    @contextlib.contextmanager
    def _pushed(self, stack: list, item) -> Iterator:
        with self._hooked():
            self._module_hooks_for(stack)
            stack.append(item)
            try:
                yield item
            finally:
                stack.remove(item)

    # --------------------------------------------------------------------------- handlers
    def _attention_handler(self, layer: int):
        def handler(module, query, key, value, mask, scaling, **kwargs):
            if not self._mine():
                return None
            n_q, n_k = query.shape[2], key.shape[2]
            partner = self._rows_from.get(layer)  # cross-attention rows are its decoder block's rows
            start = self._positions[partner].start if partner in self._positions else n_k - n_q
            self._positions[layer] = range(start, start + n_q)  # absolute rows of this call
            for tap in self._attention_taps:  # read-only observers (headscope.cache)
                tap(layer, query, key, value, mask, scaling, module, kwargs)
            scales = [s for l_, s in self._q_scales if l_ == layer]
            for s in scales:  # [H], [B, H] per batch row, or fn(positions) -> [H], [B, H] or [B, H, rows, 1]
                s = s(self._positions[layer]) if callable(s) else s
                s = s.to(device=query.device, dtype=query.dtype)
                query = query * (s.view(1, -1, 1, 1) if s.dim() == 1 else s if s.dim() == 4 else s.view(*s.shape, 1, 1))
            request = self._stats
            if request is None or layer not in request.layers:
                for edit in self._attention_edits:
                    out = edit(layer, module, query, key, value, mask, scaling, **kwargs)
                    if out is not None:
                        return out
                return hooks.stock_attention(module, query, key, value, mask, scaling, **kwargs) if scales else None
            return self._attention_with_stats(request, layer, module, query, key, value, mask, scaling, **kwargs)

        return handler

    def _attention_with_stats(self, request: StatsRequest, layer, module, query, key, value, mask, scaling, **kwargs):
        from headscope_kernels import attention_received, attention_with_stats

        n_q, n_k = query.shape[2], key.shape[2]
        q_offset = self._positions[layer].start
        common = hooks.kernel_arguments(module, query, mask, scaling, kwargs)  # causal, sliding_window, softcap
        scale, bias = common.pop("scaling"), common.pop("attn_mask")  # bias: the mask plus any position bias
        lo, hi = 0, n_q
        if request.query_rows is not None:
            lo = min(max(request.query_rows[0] - q_offset, 0), n_q)
            hi = min(max(request.query_rows[1] - q_offset, lo), n_q)
        if hi <= lo:  # none of this call's rows were asked for
            return hooks.stock_attention(module, query, key, value, mask, scaling, **kwargs)
        groups = None
        if request.key_groups is not None:
            groups = torch.full((query.shape[0], n_k), -1, dtype=torch.long, device=query.device)
            given = request.key_groups.to(query.device)[:, :n_k]
            groups[:, : given.shape[1]] = given
        extra = {}
        if request.match_ids is not None:
            key_ids, query_ids = (ids.to(query.device) for ids in request.match_ids)
            extra["key_match_ids"] = _fit(key_ids, n_k)
            extra["query_match_ids"] = _fit(query_ids[..., q_offset + lo :], hi - lo)
        sub_bias = bias[:, :, lo:hi] if bias is not None and bias.shape[2] == n_q else bias
        kernel_outputs = tuple(o for o in request.outputs if o != "received")
        if lo == 0 and hi == n_q:
            stats = attention_with_stats(
                query, key, value, scale, q_offset=q_offset, attn_mask=bias, key_groups=groups,
                num_groups=request.num_groups, outputs=("out", "lse") + kernel_outputs, **common, **extra,
            )
            out = stats.out.transpose(1, 2).contiguous()
        else:
            out = hooks.stock_attention(module, query, key, value, mask, scaling, **kwargs)
            stats = attention_with_stats(
                query[:, :, lo:hi], key, value, scale, q_offset=q_offset + lo, attn_mask=sub_bias,
                key_groups=groups, num_groups=request.num_groups, outputs=("lse",) + kernel_outputs,
                **common, **extra,
            )
        record = SimpleNamespace(**{k: v for k, v in vars(stats).items() if k != "out"})
        if "received" in request.outputs:
            record.received = attention_received(
                query[:, :, lo:hi], key, scale, stats.lse, q_offset=q_offset + lo, attn_mask=sub_bias, **common
            )
        request.calls.setdefault(layer, []).append((q_offset + lo, record))
        return out

    def _block_hook(self, layer: int):
        def hook(module, args, kwargs):
            if self._residual_watchers:
                hidden = hooks.residual_input(args, kwargs)
                for watch in self._residual_watchers:
                    watch(layer, hidden)
            return None

        return hook

    def _input_hook(self, module, args, kwargs):
        if self._input_watchers:
            inputs = dict(kwargs, input_ids=args[0]) if args else kwargs
            for watch in self._input_watchers:
                watch(inputs)
        return None

    def _out_proj_hook(self, layer: int):
        g = self.geometry

        def hook(module, args):
            if (not self._z_edits and not self._z_captures) or not self._mine():
                return None
            z = args[0]
            zh = z.view(*z.shape[:-1], g.n_heads, g.head_dim)
            for capture in self._z_captures:
                if layer in capture.layers:
                    capture.z[layer] = _select_positions(zh, capture.positions).detach()
            if not self._z_edits:
                return None
            positions = self._positions.get(layer, range(zh.shape[1]))
            if len(positions) != zh.shape[1]:
                positions = range(zh.shape[1])
            for edit in self._z_edits:
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
        layers = set(range(self.geometry.n_layers)) if layers is None else {int(x) for x in layers}
        if not layers <= set(range(self.geometry.n_layers)):
            raise HeadscopeError(f"layers must lie in 0..{self.geometry.n_layers - 1}; got {sorted(layers)}")
        names = ("top1", "group_mass", "lse", "entropy", "received", "match_mass")
        unknown = [o for o in outputs if o not in names]
        if unknown:
            raise HeadscopeError(f"unknown statistic(s) {unknown}; choose from {list(names)}")
        if "match_mass" in outputs and match_ids is None:
            raise HeadscopeError("match_mass needs match_ids=(key ids, query ids), each [C, B, N]")
        if match_ids is not None:
            match_ids = tuple(_as_channels(torch.as_tensor(ids, dtype=torch.long)) for ids in match_ids)
        if "group_mass" in outputs and (key_groups is None or num_groups < 1):
            raise HeadscopeError("group_mass needs key_groups (a group id per key) and num_groups >= 1")
        if key_groups is not None:
            key_groups = torch.as_tensor(key_groups, dtype=torch.long)
            if key_groups.dim() == 1:
                key_groups = key_groups.unsqueeze(0)
        request = StatsRequest(tuple(outputs), frozenset(layers), key_groups, num_groups, query_rows, match_ids)
        self._stats = request
        try:
            yield StatsRecording(request, self.geometry.n_layers)
        finally:
            self._stats = None
        silent = [layer for layer in layers if layer not in request.calls]
        if request.calls and silent:
            raise HeadscopeError(
                f"layers {sorted(silent)} of {type(self.model).__name__} did not call transformers' attention "
                "registry, so their attention can't be hooked"
            )

    @contextlib.contextmanager
    def capture_z(self, layers: Iterable[int] | None = None, positions="all") -> Iterator[ZCapture]:
        """Capture each head's output z (the o_proj input) as [B, positions, H, d_head].

        ``positions``: "all", "last", an int, a slice or a list of ints.
        """
        layers = range(self.geometry.n_layers) if layers is None else layers
        with self._pushed(self._z_captures, ZCapture(layers, positions)) as capture:
            yield capture

    @contextlib.contextmanager
    def tap_attention(self, tap: Callable) -> Iterator[None]:
        """Call ``tap(layer, query, key, value, mask, scaling, module, kwargs)`` with the tensors each
        layer's attention function receives (q after RoPE [B, H, q, d]; k, v [B, Hkv, k, d]); read only."""
        with self._pushed(self._attention_taps, tap):
            yield

    def run_with_cache(self, input_ids, **kwargs):
        """``(logits, cache)`` under TransformerLens hook names (``blocks.L.attn.hook_z``, ...); see
        :func:`headscope.cache.run_with_cache`."""
        from headscope.cache import run_with_cache

        return run_with_cache(self, input_ids, **kwargs)

    # --------------------------------------------------------------------------- edits
    @contextlib.contextmanager
    def edit_z(self, edit: Callable[[int, torch.Tensor, range], torch.Tensor]) -> Iterator[None]:
        """Apply ``edit(layer, z, positions)`` to the per-head outputs z [B, S, H, d] of every layer.

        ``positions`` are the absolute positions of z's S rows in this call (with a KV cache, a
        decode step's single row sits at the cache length), so edits can tell prefill from decode.
        The edit must return a new tensor (no in-place change), which keeps it differentiable.
        """
        with self._pushed(self._z_edits, edit):
            yield

    @contextlib.contextmanager
    def edit_attention(self, edit: Callable) -> Iterator[None]:
        """Replace attention outputs: ``edit(layer, module, q, k, v, mask, scaling, **kwargs)`` returns
        the output [B, q, H, d] or None (stock attention). q after RoPE [B, H, q, d]; k, v [B, Hkv, k, d]."""
        with self._pushed(self._attention_edits, edit):
            yield

    @contextlib.contextmanager
    def watch_residual(self, watch: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
        """Call ``watch(layer, hidden)`` with each layer's residual-stream input [B, S, d] (no edits)."""
        with self._pushed(self._residual_watchers, watch):
            yield

    @contextlib.contextmanager
    def watch_inputs(self, watch: Callable[[dict], None]) -> Iterator[None]:
        """Call ``watch(kwargs)`` with the keyword inputs of every forward call of the model
        (``input_ids``, ``attention_mask``, ... as generate() passes them)."""
        with self._pushed(self._input_watchers, watch):
            yield

    @contextlib.contextmanager
    def scale_queries(self, layer: int, scale: torch.Tensor) -> Iterator[None]:
        """Multiply one layer's queries per head by ``scale`` ([H], or [B, H] per batch row).

        0 gives uniform attention over the allowed keys; a small eps is the Ships ablation.
        RoPE is linear, so scaling q after RoPE equals scaling it before.
        """
        with self._pushed(self._q_scales, (layer, scale)):
            yield

    @contextlib.contextmanager
    def kv_compress(self, full: torch.Tensor | None = None, **options) -> Iterator:
        """Forward and generate with a head-wise compressed KV cache: ``full`` [L, H_kv] bool keeps those
        KV heads whole, the others keep sinks + a recent window (DuoAttention), or ``policy="headkv",
        budgets=...``; see :func:`headscope.methods.kv_compression.compress`. Yields its state."""
        from headscope.methods.kv_compression import compress

        with compress(self, full, **options) as state:
            yield state

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


@contextlib.contextmanager
def _no_loading_bars() -> Iterator[None]:
    """transformers' per-tensor "Loading weights" bar is noise around a model load; restored after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _unwrap_nnsight(model):
    """The HF model inside an nnsight model; a lazy one (built on the meta device, the default of
    ``LanguageModel(path)``) is dispatched first, so the hooks bind to the module that will run."""
    if not type(model).__module__.startswith("nnsight"):
        return model
    if getattr(model, "dispatched", True) is False:
        model.dispatch()  # nnsight would load the real weights at the first trace, into a new module
    inner = model.__dict__.get("_module")
    return inner if inner is not None else getattr(model, "_model", model)


def head_masks(heads: Iterable[Head], n_layers: int, n_heads: int) -> torch.Tensor:
    """Boolean [layers, heads] mask, True on the given heads."""
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, head in heads:
        mask[layer, head] = True
    return mask


def _as_channels(ids: torch.Tensor) -> torch.Tensor:
    """Match ids as [C, B, N] from [N], [B, N] or [C, B, N]."""
    while ids.dim() < 3:
        ids = ids.unsqueeze(0)
    return ids


def _fit(ids: torch.Tensor, n: int) -> torch.Tensor:
    """The first n positions of [..., N] ids, padded with -1 (never matches) if N < n."""
    if ids.shape[-1] >= n:
        return ids[..., :n].contiguous()
    pad = torch.full((*ids.shape[:-1], n - ids.shape[-1]), -1, dtype=ids.dtype, device=ids.device)
    return torch.cat([ids, pad], dim=-1)


def _select_positions(z: torch.Tensor, positions) -> torch.Tensor:
    if isinstance(positions, str):
        if positions == "all":
            return z
        if positions == "last":
            return z[:, -1:]
        raise HeadscopeError(f"positions must be 'all', 'last', an int, a slice or a list; got {positions!r}")
    if isinstance(positions, int):
        return z[:, positions : positions + 1] if positions != -1 else z[:, -1:]
    if isinstance(positions, slice):
        return z[:, positions]
    return z[:, list(positions)]


def _load_processor(source: str, config):
    """The processor of an image-text model folder (None for text models or when it has none)."""
    if not hasattr(config, "vision_config"):
        return None
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source)
    except (OSError, ValueError, TypeError, ImportError):
        return None


def _auto_class(config):
    """The auto class whose mapping holds the config's architecture (T5/BART -> Seq2SeqLM, LLaVA ->
    ImageTextToText, Llama -> CausalLM); without ``architectures``, a guess from the config."""
    import transformers as tf

    autos = (tf.AutoModelForImageTextToText, tf.AutoModelForCausalLM, tf.AutoModelForSeq2SeqLM,
             tf.AutoModelForSpeechSeq2Seq, tf.AutoModelForMaskedLM)
    archs = getattr(config, "architectures", None) or []
    for auto in autos:
        mapping = auto._model_mapping
        if type(config) in mapping:
            classes = mapping[type(config)]
            names = {c.__name__ for c in (classes if isinstance(classes, (tuple, list)) else (classes,))}
            if names & set(archs):
                return auto
    if hasattr(config, "vision_config"):
        return tf.AutoModelForImageTextToText
    if getattr(config, "is_encoder_decoder", False):
        return tf.AutoModelForSeq2SeqLM
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs) or getattr(config, "is_decoder", False):
        return tf.AutoModelForCausalLM
    if not archs and config.model_type in ("llama", "gpt2", "qwen2", "mistral", "gemma", "phi3"):
        return tf.AutoModelForCausalLM
    return tf.AutoModel


def _in_features(module: torch.nn.Module) -> int:
    """Input width of a projection: nn.Linear (in_features) or GPT-2's Conv1D (nx)."""
    width = getattr(module, "in_features", None) or getattr(module, "nx", None)
    return int(width if width is not None else module.weight.shape[-1])


def _row_partners(layers: list) -> dict[int, int]:
    """Cross-attention layer -> the decoder self-attention layer of its block, whose rows it shares."""
    self_attn = {lm.block_path: i for i, lm in enumerate(layers) if lm.stack == "decoder"}
    return {
        i: self_attn[lm.block_path] for i, lm in enumerate(layers) if lm.stack == "cross" and lm.block_path in self_attn
    }
