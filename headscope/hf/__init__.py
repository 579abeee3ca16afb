"""The only code that knows transformers / accelerate internals.

- :mod:`~headscope.hf.adapters`: the family table (where each architecture keeps its attention);
  a new architecture is one row there;
- :mod:`~headscope.hf.attention`: the attention router (transformers' ``AttentionInterface``, or
  torch SDPA calls for families that make them);
- :mod:`~headscope.hf.loading`: the auto class, device_map / offload, tokenizer and processor;
- :mod:`~headscope.hf.inputs`: image-token id, left-padded position ids, the pad id;
- :mod:`~headscope.hf.devices`: where a module runs and its (possibly offloaded) weights;
- :mod:`~headscope.hf.cache`: the KV-cache classes the cache-compression edit builds on.
"""
