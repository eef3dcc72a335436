# The character-level Shakespeare model with ALiBi (Press et al., 2021) in place of learned
# position embeddings: each head subtracts slope * distance from its attention scores, so the
# model has no position table and can read windows longer than the block_size it trained on
# (see sample_alibi_extrapolation.py).
# python data/shakespeare_char/prepare.py && python train.py config/train_shakespeare_char_alibi.py

exec(open('config/train_shakespeare_char.py').read())

out_dir = 'out-shakespeare-char-alibi'
wandb_run_name = 'mini-gpt-alibi'
use_alibi = True
