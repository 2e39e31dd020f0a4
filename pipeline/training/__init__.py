"""What a stage computes: data preparation, the engine, inference, metrics and pictures."""
