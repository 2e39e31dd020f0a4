"""Sweep specifications (search spaces over config keys) and the Ray Tune sweep runner."""
