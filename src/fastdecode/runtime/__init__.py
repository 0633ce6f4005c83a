"""Building blocks of the decode loop: KV cache, draft trees, sampling."""
