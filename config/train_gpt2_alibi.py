# GPT-2 (124M) on OpenWebText with ALiBi (Press et al., 2021) in place of learned position
# embeddings: no position table (wpe) and attention that extrapolates past block_size.
# The attention then takes an explicit bias mask instead of the fused causal kernel, which
# costs some speed on GPUs.
# python data/openwebtext/prepare.py
# torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_alibi.py

exec(open('config/train_gpt2.py').read())

out_dir = 'out-gpt2-alibi'
wandb_run_name = 'gpt2-124M-alibi'
use_alibi = True
