# `make tool-demo`: a chat model that calls the calculator for the built-in task's hard variant
# (data/chat/prepare.py --task=products: products of two 3- to 5-digit numbers), fine-tuned from scratch with the
# loss on the assistant's own tokens only (the calculator's outputs are not learned: the engine feeds them).
# python data/chat/prepare.py --task=products --vocab_size=320 && python train.py config/train_tool_demo.py

out_dir = 'out-tool'
dataset = 'chat'
device = 'cpu'
compile = False
dtype = 'float32'
eval_interval = 500
eval_iters = 10
log_interval = 50
# a conversation of the task is at most ~70 tokens; every window starts at one
block_size = 96
batch_size = 32
gradient_accumulation_steps = 1
n_layer = 4
n_head = 4
n_embd = 128
use_rope = True
dropout = 0.0
learning_rate = 3e-3
max_iters = 2000
lr_decay_iters = 2000
warmup_iters = 50
min_lr = 3e-4
weight_decay = 0.0
