"""The s4mim pipeline: CLI, config and presets, stages, orchestration and tracking."""
