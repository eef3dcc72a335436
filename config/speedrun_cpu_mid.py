# speedrun.sh's CPU run, midtraining: the base model on a mixture of conversations (data/chat/prepare.py
# --mix of the built-in tasks, with calculator calls) with the loss on every token (chat_loss='all', as
# nanochat's midtraining): the model learns the chat and tool tokens, the questions and the replies' form.
init_from = 'base'
out_dir = 'mid'
dataset = 'mid'
chat_loss = 'all'
device = 'cpu'
compile = False
dtype = 'float32'
eval_interval = 500
eval_iters = 20
log_interval = 100
block_size = 128
batch_size = 32
gradient_accumulation_steps = 1
dropout = 0.0
learning_rate = 2e-3
max_iters = 1500
lr_decay_iters = 1500
warmup_iters = 50
min_lr = 2e-4
weight_decay = 0.0
