"""N2-Eye: build, train, evaluate and serve small vision-language chat models (LFM2 + SigLIP)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`n2eye.load` without importing torch at `import n2eye`."""
    if name in ("load", "N2Eye"):
        from .infer import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'n2eye' has no attribute {name!r}")
