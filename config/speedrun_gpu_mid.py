# speedrun.sh's GPU run, midtraining: the d20 base model on a conversation mixture (SmolTalk, MMLU, GSM8K and
# the built-in tasks with calculator calls; data/chat/prepare.py --mix) with the loss on every token, as
# nanochat's midtraining; ~420M tokens.
init_from = 'base'
out_dir = 'mid'
dataset = 'mid'
chat_loss = 'all'
device = 'cuda'
dtype = 'bfloat16'
compile = True
eval_interval = 200
eval_iters = 50
log_interval = 20
block_size = 2048
batch_size = 32
gradient_accumulation_steps = 8
dropout = 0.0
optimizer = 'muon'
learning_rate = 3e-3
muon_lr = 0.02
max_iters = 800
lr_decay_iters = 800
warmup_iters = 0
min_lr = 0.0
weight_decay = 0.0
peak_flops = 989e12
