"""Reproducible performance runs of costserve (``make bench`` runs :mod:`benchmarks.serving`)."""
