# nanoGPT's documented CPU run of the character-level Shakespeare model: the GPU config
# shrunk to a 4-layer, 128-wide model on 64-character windows, 2000 iterations, no dropout.
# Best val loss about 1.88-1.89; see the README for how long it takes.
# python data/shakespeare_char/prepare.py && python train.py config/train_shakespeare_char_cpu.py

exec(open('config/train_shakespeare_char.py').read())

device = 'cpu'
compile = False
dtype = 'auto'  # bfloat16 autocast on CPUs with native bfloat16 (float32 weights and optimizer), else float32
eval_iters = 20
log_interval = 1
block_size = 64
batch_size = 12
n_layer = 4
n_head = 4
n_embd = 128
max_iters = 2000
lr_decay_iters = 2000
dropout = 0.0
