"""The seed README's "CPU Training (Reduced Model)": 4 layers, 4 heads, 128 wide, block 256, batch 8.

`unmask train cpu` is the same as the README's command with `python train_run.py` replaced by `unmask train`.
Dropout is lowered from the framework default 0.2 to 0.1: the README advises 0.0-0.1 for small models.
"""

device = "cpu"
compile = False
dtype = "float32"
batch_size = 8
block_size = 256
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.1
max_iters = 10000
learning_rate = 5e-4
warmup_iters = 500
