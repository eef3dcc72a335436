# GPT-2 (124M) on OpenWebText: about 2.85 val loss after ~5 days on one node of 8 A100 40GB.
# python data/openwebtext/prepare.py
# torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

wandb_log = True
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M'

# 12 batch size * 1024 block size * 5 gradaccum * 8 GPUs = 491,520 tokens per iteration
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# 600,000 iterations: about 300B tokens
max_iters = 600000
lr_decay_iters = 600000

# eval stuff
eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
