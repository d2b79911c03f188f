"""The seed README's GPU defaults ("Standard Unmasking Training" and "For GPU Training").

6 layers, 6 heads, 384 wide, block 1024, batch 16, learning rate 1e-3, float16 with a GradScaler, compiled.
"""

device = "cuda"
compile = True
dtype = "float16"
batch_size = 16
block_size = 1024
n_layer = 6
n_head = 6
n_embd = 384
max_iters = 5000
learning_rate = 1e-3
warmup_iters = 500
