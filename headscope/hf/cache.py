"""The KV-cache classes of transformers 5 that headscope builds on (``Cache`` with per-layer
``CacheLayerMixin`` objects, ``DynamicCache`` for the full cache): imported here only, so a rename
in transformers changes one file. Used by the head-wise cache compression edit kind."""

from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

__all__ = ["Cache", "CacheLayerMixin", "DynamicCache"]
