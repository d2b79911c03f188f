"""Configuration: `--key=value` flags, command parsing, `TrainConfig`, the presets."""
