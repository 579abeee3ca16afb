"""Methods: recipes that combine analyzers and edits or own a decoding loop (DeCoRe, VHR, soft injection fitting, head-wise KV-cache compression)."""
