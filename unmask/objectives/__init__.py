"""Training objectives: one class per objective, registered by name."""
