"""Synthetic datasets and dataset checks for training (application layer: nothing in the
pipeline imports this package)."""
