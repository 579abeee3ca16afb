"""Methods built on head scores (generation-time caches and fits)."""
