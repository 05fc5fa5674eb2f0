"""Files copied verbatim into every checkpoint (import only torch, transformers, Pillow and the stdlib)."""
