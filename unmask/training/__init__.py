"""Training: the loop, the learning-rate schedule, preemption, the run log, validation."""
