"""Datasets: readers (voc, cityscapes, shapes, custom), validation, splits, Parquet manifests,
augmentation and torch Datasets."""
