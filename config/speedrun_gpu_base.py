# speedrun.sh's GPU run, base pretraining: nanochat's depth-20 shape (20 layers of 1280, 10 heads of 128,
# rotary, RMSNorm, QK-norm, ReLU^2, untied head, normalised embedding, logits capped at 15, Muon for the
# matrices) on FineWeb-Edu in GPT-2's BPE (data/openwebtext/prepare.py), 522M parameters. 21,400 steps of
# 524,288 tokens = 11.2B tokens, 21 per parameter (Chinchilla's 20), as nanochat's d20. On 8 H100s (torchrun,
# DDP): the batch is 8 GPUs x 32 x 2048 tokens, no accumulation.
out_dir = 'base'
dataset = 'base'
device = 'cuda'
dtype = 'bfloat16'
compile = True
eval_interval = 2000
eval_iters = 50
log_interval = 50
block_size = 2048
batch_size = 32
gradient_accumulation_steps = 8  # across the ranks: 1 per GPU on 8
n_layer = 20
n_head = 10
n_embd = 1280
use_rope = True
norm = 'rmsnorm'
qk_norm = True
mlp = 'relu2'
bias = False
tie_embeddings = False
embed_norm = True
logit_softcap = 15.0
dropout = 0.0
optimizer = 'muon'
learning_rate = 3e-3  # the embeddings' and head's (AdamW)
muon_lr = 0.02
max_iters = 21400
lr_decay_iters = 21400
warmup_iters = 200
min_lr = 3e-4
weight_decay = 0.0
peak_flops = 989e12  # an H100 SXM's bf16, for MFU
