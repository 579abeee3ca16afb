"""Run headscope's NDIF path with remote="local" while headscope cannot be imported server-side.

Started as a subprocess by tests/test_remote.py; prints one JSON line. headscope counts as an
installed package (pickled by reference, as after `pip install headscope`), so only what
headscope.interop registers by value (headscope.remote) travels with the request; while nnsight
deserialises it, every import of headscope raises (the NDIF server has no headscope).
"""

import importlib.abc
import json
import sys

import torch
import transformers as tf
from nnsight import ndif
from nnsight.schema.request import RequestModel

from headscope.analyzers.safety import ships_per_query
from headscope.interop import apply_edits_nnsight, nnsight_model, nnsight_plan, nnsight_sources, ships_plan
from headscope.interventions import Edit, intervene
from headscope.model import HeadModel
from headscope.remote import apply_plan, ships_kl
from headscope.zoo.training import build_word_tokenizer

ndif._PULLED_ENV = True  # do not auto-register headscope by value: it is "installed"


class BlockHeadscope(importlib.abc.MetaPathFinder):
    active = False
    attempts: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if self.active and name.split(".")[0] == "headscope":
            self.attempts.append(name)
            raise ImportError(f"headscope is not installed on this server ({name})")
        return None


blocker = BlockHeadscope()
sys.meta_path.insert(0, blocker)
deserialize = RequestModel.deserialize
deserialised = []


def server_deserialize(*args, **kwargs):
    hidden = {n: sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] == "headscope"}
    blocker.active = True
    try:
        out = deserialize(*args, **kwargs)
        deserialised.append(True)
        return out
    finally:
        blocker.active = False
        sys.modules.update(hidden)


RequestModel.deserialize = staticmethod(server_deserialize)

torch.manual_seed(0)
config = tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=128, max_position_embeddings=256)
model = tf.LlamaForCausalLM(config).eval()
model.set_attn_implementation("sdpa")
hm = HeadModel(model, build_word_tokenizer(["a b c"]))
lm = nnsight_model(hm)
gen = torch.Generator().manual_seed(2)
ids = torch.randint(0, 128, (2, 9), generator=gen)
cases = {
    "zero": [Edit("zero", [(0, 1), (1, 3)])],
    "scale": [Edit("scale", [(1, 0), (0, 2)], strength=[-1.0, 3.0], positions=(2, 7))],
    "mean": [Edit("mean", [(1, 2)], strength=0.8, source=torch.randint(0, 128, (3, 6), generator=gen))],
    "patch": [Edit("patch", [(0, 3)], positions="last", source=torch.randint(0, 128, (1, 9), generator=gen))],
}
result = {"edits": {}, "ships": {}}
for name, edits in cases.items():
    plan = nnsight_plan(lm, edits, ids.shape, sources=nnsight_sources(lm, edits))
    with torch.no_grad(), lm.trace(ids, remote="local"):
        apply_plan(lm, plan)
        logits = lm.output.logits.save()
    with torch.no_grad(), intervene(hm, edits):
        ref = hm.model(ids).logits
    with torch.no_grad():
        plain = hm.model(ids).logits
    result["edits"][name] = [float((torch.as_tensor(logits) - ref).abs().max()), float((ref - plain).abs().max())]

query = ids[:1]
heads = [(0, 0), (0, 3), (1, 1), (1, 2)]
for ablation in ("query", "output"):
    plan = ships_plan(lm, heads, eps=1e-4, ablation=ablation)
    with torch.no_grad(), lm.trace(query.expand(len(heads) + 1, -1), remote="local"):
        kl = ships_kl(lm, plan)
    with torch.no_grad():
        ref = ships_per_query(hm, query[0].tolist(), heads=heads, ablation=ablation)
    ref = torch.stack([ref[l, h] for l, h in heads])
    result["ships"][ablation] = [float((torch.as_tensor(kl) - ref).abs().max()), float(ref.abs().max())]

result["deserialised"] = len(deserialised)
result["blocked_before_control"] = list(blocker.attempts)
try:  # control: the old in-trace call into headscope cannot be deserialised without headscope
    with torch.no_grad(), lm.trace(ids, remote="local"):
        apply_edits_nnsight(lm, cases["zero"], ids.shape)
        lm.output.logits.save()
    result["control"] = "ran"
except Exception as exc:  # noqa: BLE001 - report whatever the server side raised
    result["control"] = f"{type(exc).__name__}: {exc}"[:300]
result["blocked"] = list(blocker.attempts)
print(json.dumps(result))
