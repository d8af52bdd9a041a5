"""Synthetic datasets and training crops (application layer: nothing in the pipeline imports
this package). The TIL reader is producer/dataset.py."""
