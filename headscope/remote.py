"""The code headscope runs inside an nnsight trace, also on an NDIF server: torch and nnsight only.

An NDIF server has torch, transformers and nnsight, not headscope. So everything that needs
headscope (checking edits, reading the module layout, computing keep masks and mean / patch
sources) happens before the trace and produces a *plan* of plain data: module paths, ints and
tensors (:func:`headscope.interop.nnsight_plan`, :func:`headscope.interop.ships_plan`). Inside the
trace only the functions of this module run; they import nothing from headscope, and
``headscope.interop`` registers this module with nnsight to ship by value (its source travels with
the request)::

    plan = nnsight_plan(lm, edits, ids.shape, sources=nnsight_sources(lm, edits))
    with lm.trace(ids, remote=True):
        apply_plan(lm, plan)
        logits = lm.output.logits.save()

Keep this module free of headscope imports: ``tests/test_remote.py`` runs it with headscope's
import blocked while nnsight deserialises the request.
"""

import torch


def z_edit(kind: str, z: torch.Tensor, weight: torch.Tensor, hit: torch.Tensor, source=None) -> torch.Tensor:
    """One z-edit (docs/METHODS.md, "Interventions") on head outputs z [B, S, H, d].

    ``weight``: strength where the edit applies, else 0; ``hit``: 1 where it applies, else 0 (both
    broadcast to [B, S, H, 1]); ``source``: the mean [H, d] or the patch values [B|1, S, H, d].
    """
    if kind == "zero":
        return z - weight * z
    if kind == "scale":
        return z + hit * (weight - 1) * z
    return z + weight * (source.to(z) - z)  # mean, patch


def module(lm, dotted: str):
    """The nnsight envoy at a dotted module path (digits index module lists)."""
    node = lm
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def apply_plan(lm, plan) -> None:
    """Inside a trace: apply a z-edit plan (layers in execution order) at each output projection's input."""
    for step in plan:
        o_proj = module(lm, step["path"])
        x = o_proj.input
        z = x.reshape(*x.shape[:-1], step["n_heads"], step["head_dim"])
        for e in step["edits"]:
            z = z_edit(e["kind"], z, e["weight"].to(z), e["hit"].to(z), e.get("source"))
        o_proj.input = z.reshape(x.shape)


def ships_kl(lm, plan):
    """Inside a trace over ``plan["copies"]`` copies of one query: row 0 runs the model as it is,
    row r >= 1 scales the queries (or outputs) of one head by eps (Ships, Zhou et al. 2024).
    Returns the saved KL(base || ablated) of the next-token distribution per ablated row."""
    for step in plan["layers"]:  # [R, H] multipliers per row and head of this layer
        target = module(lm, step["path"])
        x = target.output if plan["ablation"] == "query" else target.input
        scale = step["scale"].to(x).repeat_interleave(plan["head_dim"], dim=1).unsqueeze(1)  # [R, 1, H*d]
        if plan["ablation"] == "query":
            target.output = x * scale
        else:
            target.input = x * scale
    p = lm.output.logits[:, -1].double().softmax(-1)
    return kl_divergence(p[:1], p[1:]).save()


def kl_divergence(p_base: torch.Tensor, p_ablated: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p_ablated) over the last axis, 1e-12 added inside the logs (the Ships reference code)."""
    p, q = p_base.double(), p_ablated.double()
    return (p * (torch.log(p + 1e-12) - torch.log(q + 1e-12))).sum(-1)
