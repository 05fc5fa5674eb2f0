"""N2-Eye: build, train, evaluate and serve small vision-language chat models (LFM2 + SigLIP)."""

__version__ = "0.1.0"
