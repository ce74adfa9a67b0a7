"""Datasets (COCO files, the synthetic shapes generator) and the global-shuffle sampler."""
