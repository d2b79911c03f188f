"""Training objectives: the interface (`base`), one module per objective, and the `registry` that names them."""
