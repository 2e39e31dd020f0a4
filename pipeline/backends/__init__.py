"""Where a stage runs: in this process (or under torchrun), or as a Ray Train job."""
