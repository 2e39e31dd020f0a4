"""Settings: the validated config and its presets."""
