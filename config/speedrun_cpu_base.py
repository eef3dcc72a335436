# speedrun.sh's CPU run, base pretraining: a 4-layer rotary model on the local text (Tiny Shakespeare) in a
# 2048-token BPE that has the chat and tool tokens already (data/custom/prepare.py --tokenizer=bpe), so the
# later stages add no token. ~1M parameters: minutes on 2 cores. The text is ~0.3M tokens: past ~10 epochs
# the val loss turns up, hence few iterations and some dropout.
out_dir = 'base'
dataset = 'base'
device = 'cpu'
compile = False
dtype = 'float32'
eval_interval = 200
eval_iters = 20
log_interval = 50
block_size = 128
batch_size = 32
gradient_accumulation_steps = 1
n_layer = 4
n_head = 4
n_embd = 128
use_rope = True
dropout = 0.1
learning_rate = 3e-3
max_iters = 600
lr_decay_iters = 600
warmup_iters = 50
min_lr = 3e-4
weight_decay = 0.1
