"""Embedded datasets for fcos-d2 (synthetic data generated as code, so training needs no downloads)."""
