"""The commands beside the pipeline: predict, bench, quality and doctor."""
