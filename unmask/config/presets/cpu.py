"""The seed README's "CPU Training (Reduced Model)": 4 layers, 4 heads, 128 wide, block 256, batch 8.

`unmask train cpu` is the same as the README's command with `python train_run.py` replaced by `unmask train`.
Dropout is 0.0 instead of the framework default 0.2: the README advises 0.0-0.1 for small models, short CPU runs do
not overfit 1M characters, and on the CPU any dropout moves attention off the fused SDPA kernel (measured: 357 vs
202 ms per step for batch 8 x 256 on 2 cores).
"""

device = "cpu"
compile = False
dtype = "float32"
batch_size = 8
block_size = 256
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
max_iters = 10000
learning_rate = 5e-4
warmup_iters = 500
