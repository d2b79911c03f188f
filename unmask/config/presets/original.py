"""The original framework's curriculum: its README's three sticky stages (20 / 40 / 60 % masked), advancing by
stale count only, and nothing after them (the default curriculum adds a final stage at up to 100 % masking).
Combine with any other flags: `unmask train original --n_layer=4 ...`."""

unmasking_stages = [
    {"type": "sticky", "target_masked_ratio": 0.2, "p1_probability": 0.3, "p2_probability": 0.0,
     "val_loss_stale_count": 5},
    {"type": "sticky", "target_masked_ratio": 0.4, "p1_probability": 0.2, "p2_probability": 0.8,
     "val_loss_stale_count": 5},
    {"type": "sticky", "target_masked_ratio": 0.6, "p1_probability": 0.1, "p2_probability": 0.9,
     "val_loss_stale_count": 10},
]  # fmt: skip
