# speedrun.sh's GPU run, SFT: the midtrained model on ARC, GSM8K, a part of SmolTalk and the built-in tasks,
# the loss on the assistant's replies only, at a fifth of midtraining's learning rates.
init_from = 'mid'
out_dir = 'sft'
dataset = 'sft'
chat_loss = 'replies'
device = 'cuda'
dtype = 'bfloat16'
compile = True
eval_interval = 100
eval_iters = 50
log_interval = 20
block_size = 2048
batch_size = 16
gradient_accumulation_steps = 8
dropout = 0.0
optimizer = 'muon'
learning_rate = 6e-4
muon_lr = 0.004
max_iters = 600
lr_decay_iters = 600
warmup_iters = 0
min_lr = 0.0
weight_decay = 0.0
peak_flops = 989e12
