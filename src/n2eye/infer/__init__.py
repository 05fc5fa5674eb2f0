"""Inference: loading checkpoints and generating answers."""
