"""The parameter guide's "Recommended" column (docs/origin.md §3, "Comprehensive Training Parameters Guide"), for a
character model.

Reproduced rows: epochs per stage 75 / 150 / 300; stage III masking_rate_range (0.05, 0.20);
learning_rate_decay_factors [1.0, 0.8, 0.5] (each stage's lr_factor); batch_size 8 with gradient accumulation 2
(the same 16 sequences per optimizer step as the current column); learning_rate 1e-4; weight_decay 0.01;
gradient clipping 1.0; warmup 1500 steps; AdamW with betas (0.9, 0.95) and eps 1e-8; cosine_with_restarts with
eta_min = lr * 0.05 (min_lr_ratio); label smoothing 0.1 (over the real characters only, never [MASK]).
The scheduler restarts at every stage change (lr_restart_period = 0): the guide names the scheduler but not its
period, and its stages are the natural cycles. Stages are duration-only: each lasts its epochs, and the run ends
when stage III has lasted its own (max_iters is only a cap).

Not from the guide (identical in guide_current, so the two presets differ only where the guide's columns do):
- The stage I / II masking ranges, which the guide does not give. Chosen easy to hard: I (0.02, 0.10),
  II (0.05, 0.25); fewer masked characters leave more context, so stage I is the easiest per-character task.
  The recommended stage III (0.05, 0.20) is lighter than stage II: that is the guide's "lighter masking for
  refinement" and is kept as given.
- The model: none is set here, so the framework defaults apply (6 layers, 6 heads, 384 wide, block 1024,
  dropout 0.2); the guide's recipe is not a model choice.
- Batches mix stages 0..current evenly (the framework's curriculum).
- The guide's generation values (temperature 0.6, top_k 20, top_p 0.85, 25 steps) belong to
  `unmask sample --preset=guide`.

To run at CPU scale, shrink every stage with --stage_duration_scale (and --warmup_iters by the same factor), the
same for both guide presets; docs/recipes.md has the measured comparison.
"""

objective = "unmasking"
learning_rate = 1e-4
min_lr_ratio = 0.05
lr_schedule = "cosine_with_restarts"
lr_restart_period = 0
warmup_iters = 1500
batch_size = 8
gradient_accumulation_steps = 2
weight_decay = 0.01
grad_clip = 1.0
beta1 = 0.9
beta2 = 0.95
adam_eps = 1e-8
label_smoothing = 0.1
max_iters = 10_000_000
unmasking_stages = [
    {"type": "random", "masking_rate_range": [0.02, 0.10], "epochs": 75, "lr_factor": 1.0},
    {"type": "random", "masking_rate_range": [0.05, 0.25], "epochs": 150, "lr_factor": 0.8},
    {"type": "random", "masking_rate_range": [0.05, 0.20], "epochs": 300, "lr_factor": 0.5},
]
