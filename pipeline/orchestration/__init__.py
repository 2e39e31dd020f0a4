"""Running stages in order, each once: the stage cache, its fingerprints and locks."""
