"""unmask: masked discrete-diffusion ("unmasking") language models, character-level first."""

__version__ = "0.1.0"
