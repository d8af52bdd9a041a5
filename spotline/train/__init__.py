"""Fine-tuning recipes for the scorer and the detector (application layer: nothing in the
pipeline imports this package)."""
