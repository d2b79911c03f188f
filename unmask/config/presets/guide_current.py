"""The parameter guide's "Current" column (docs/origin.md §3), for a character model.

Reproduced rows: epochs per stage 50 / 100 / 150; stage III masking_rate_range (0.10, 0.30);
learning_rate_decay_factors [1.0, 0.8, 0.6] (each stage's lr_factor); batch_size 16 without gradient
accumulation; learning_rate 2e-4; weight_decay 0.1; gradient clipping 1.0; warmup 1000 steps; AdamW with betas
(0.9, 0.95) and eps 1e-8; cosine_with_restarts with eta_min = lr * 0.1 (min_lr_ratio); label smoothing 0.0.
The scheduler restarts at every stage change (lr_restart_period = 0): the guide names the scheduler but not its
period, and its stages are the natural cycles. Stages are duration-only: each lasts its epochs, and the run ends
when stage III has lasted its own (max_iters is only a cap).

Not from the guide:
- The stage I / II masking ranges, which the guide does not give. Chosen easy to hard, ending at stage III:
  I (0.02, 0.10), II (0.05, 0.25), III (0.10, 0.30); the mean masking ratio grows 0.06 -> 0.15 -> 0.20. Fewer
  masked characters leave more context, so the per-character task is easiest in stage I (the guide's own
  reading: "lower masking = more context available = easier"). Both guide presets use the same stage I / II
  ranges, so they differ only where the guide's columns differ.
- The model: none is set here, so the framework defaults apply (6 layers, 6 heads, 384 wide, block 1024,
  dropout 0.2); the guide's recipe is not a model choice. Add model flags or a second preset to change it.
- Batches mix stages 0..current evenly (the framework's curriculum), where the guide's trainer presumably trains
  on the current stage's range only.
- The guide's generation values (temperature, top_k, top_p, steps) belong to `unmask sample --preset=guide`.

To run at CPU scale, shrink every stage with --stage_duration_scale (and --warmup_iters by the same factor), the
same for both guide presets; docs/recipes.md has the measured comparison.
"""

objective = "unmasking"
learning_rate = 2e-4
min_lr_ratio = 0.1
lr_schedule = "cosine_with_restarts"
lr_restart_period = 0
warmup_iters = 1000
batch_size = 16
gradient_accumulation_steps = 1
weight_decay = 0.1
grad_clip = 1.0
beta1 = 0.9
beta2 = 0.95
adam_eps = 1e-8
label_smoothing = 0.0
max_iters = 10_000_000
unmasking_stages = [
    {"type": "random", "masking_rate_range": [0.02, 0.10], "epochs": 50, "lr_factor": 1.0},
    {"type": "random", "masking_rate_range": [0.05, 0.25], "epochs": 100, "lr_factor": 0.8},
    {"type": "random", "masking_rate_range": [0.10, 0.30], "epochs": 150, "lr_factor": 0.6},
]
