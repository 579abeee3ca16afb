"""Models split over devices (accelerate's ``device_map``): where a module runs, and its weights.

``from_pretrained(..., device_map=...)`` dispatches a model with accelerate: each block runs on
its own device, and offloaded blocks keep their weights on the ``meta`` device between calls
(loaded from CPU RAM or disk by an ``AlignDevicesHook`` at forward time). headscope therefore
builds every tensor on the device of the tensor it meets (q, z, logits) and reads weights
through :func:`weight`, never through ``module.weight`` directly.
"""

from __future__ import annotations

import json
import re

import torch

from headscope.errors import HeadscopeError
from headscope.validate import check_device


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device a module computes on: its accelerate hook's execution device, else its weights'."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def weight(module: torch.nn.Module, name: str = "weight") -> torch.Tensor:
    """A parameter's values, also when accelerate offloaded it (then read from the offload map)."""
    value = getattr(module, name)
    if value.device.type != "meta":
        return value.detach()
    hook = getattr(module, "_hf_hook", None)
    weights_map = getattr(hook, "weights_map", None)
    if weights_map is None:
        raise HeadscopeError(f"{type(module).__name__}.{name} is on the meta device with no offload map to read it "
                             "from; load the model with device_map=... (accelerate) or without meta tensors")
    return weights_map[name].detach().to(execution_device(module))


def parse_device_map(text: str | None):
    """The CLI's ``--device-map``: "auto" / "balanced" / "sequential", or JSON ``{"module": device}``."""
    if text is None or text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    try:
        mapping = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        mapping = None
    if not isinstance(mapping, dict):
        raise HeadscopeError(f"--device-map must be auto, balanced, balanced_low_0, sequential or a JSON object "
                             f"like '{{\"model.layers.0\": 0, \"model.layers.1\": 1}}'; got {text!r}")
    return mapping


def check_devices(device_map, max_memory: dict | None) -> None:
    """Every device a parsed ``--device-map`` / ``--max-memory`` names exists here (before any weights load)."""
    for module, target in (device_map.items() if isinstance(device_map, dict) else ()):
        check_target(target, f"--device-map {module!r}:")
    for target in max_memory or ():
        check_target(target, "--max-memory")


def check_target(target, option: str) -> None:
    """A device_map / max_memory device that exists here: "cpu", "disk", an accelerator index (accelerate's
    int) or a torch device string such as "cuda:0"; otherwise a one-line error before any weights load."""
    if target in ("cpu", "disk"):
        return
    if isinstance(target, int) and not isinstance(target, bool):
        available = hasattr(torch, "accelerator") and torch.accelerator.is_available()
        count = torch.accelerator.device_count() if available else 0
        if not 0 <= target < count:
            have = f"accelerators 0..{count - 1}" if count else "no accelerator (GPU)"
            raise HeadscopeError(f"{option} device {target} does not exist: this machine has {have}; use "
                                 + ("an index in that range, " if count else "") + "\"cpu\" or \"disk\"")
        return
    if not isinstance(target, str):
        raise HeadscopeError(f"{option} device {target!r} must be \"cpu\", \"disk\", a device index or a device "
                             "like \"cuda:0\"")
    check_device(target, option)


def parse_max_memory(text: str | None) -> dict | None:
    """The CLI's ``--max-memory``: ``0=20GiB,1=20GiB,cpu=64GiB`` -> {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}."""
    if not text:
        return None
    out: dict = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise HeadscopeError(f"--max-memory takes DEVICE=SIZE pairs separated by commas, e.g. 0=20GiB,cpu=64GiB; "
                                 f"got {text!r}")
        key = key.strip()
        device = int(key) if key.isdigit() else key
        if device in out:
            raise HeadscopeError(f"--max-memory names device {key} twice ({text!r}); give one budget per device")
        out[device] = _check_size(key, value.strip())
    return out


_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}  # accelerate's


def _check_size(device: str, value: str) -> str:
    """A ``--max-memory`` budget accelerate can hold: a finite number >= 0 and a unit, under 2**63 bytes."""
    match = re.fullmatch(r"([0-9.eE+]+)\s*([A-Za-z]+)", value)
    try:
        units = {unit.lower(): factor for unit, factor in _SIZE_UNITS.items()}
        size = float(match.group(1)) * units[match.group(2).lower()] if match else None
    except (ValueError, KeyError):
        size = None
    if size is None or not 0 <= size < 2**63:
        raise HeadscopeError(f"--max-memory {device}={value}: give a size of at least 0 bytes and under 8 EiB with "
                             f"a unit ({', '.join(_SIZE_UNITS)}), "
                             "e.g. 20GiB")
    return value
