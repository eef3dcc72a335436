# The fastest setup found to reach the quality of nanoGPT's CPU run on the character-level
# Shakespeare model: a full val loss at or below what
#   python train.py config/train_shakespeare_char_cpu.py --eval_full_val=True
# reaches (about 1.90), in well under half of its wall time. Measured numbers and the search
# are in the README (Architecture switches and Muon).
# python data/shakespeare_char/prepare.py && python train.py config/speedrun_shakespeare_char_cpu.py

exec(open('config/train_shakespeare_char_cpu.py').read())

out_dir = 'out-speedrun-shakespeare-char'
eval_full_val = True  # the number that counts: the loss over the whole val split, printed at the end

# Muon on the matrices inside the blocks learns far more per step than AdamW (it orthogonalises
# each update, so every direction of the matrix moves), and AdamW at a high rate on the rest.
optimizer = 'muon'
muon_lr = 0.04
learning_rate = 1e-2  # the embeddings, the head and the norm gains (AdamW)
# qk_norm bounds the attention logits: without it these rates end much worse (1.97 to 2.11)
qk_norm = True
# each learns more per step than GPT-2's choice, for a few percent more time per step
use_rope = True
norm = 'rmsnorm'
mlp = 'relu2'
tie_embeddings = False  # a separate head: the input and output embeddings need not agree
# one key/value head shared by the 4 query heads (multi-query attention): about 10% less
# time per step, and here no worse (1.855 vs 1.867 with 4 heads)
n_kv_head = 1

# 3 layers instead of 4: a quarter less compute per token for little loss, and each step's
# Muon orthogonalisation (a fixed cost per matrix, whatever the batch) shrinks with it
n_layer = 3
# twice the batch, 300 steps instead of 2000: Muon's fixed per-step cost is spread over
# more tokens, and this short schedule sees 460k tokens, under a third of the baseline's
batch_size = 24
max_iters = 300
lr_decay_iters = 300
warmup_iters = 20  # short, but 10 ended worse
min_lr = 0.0  # a short run ends best with the rate decayed all the way to zero

# evaluation is time too: only at the start and at the end (a few batches; the full val
# loss after the last step is the real measure)
eval_interval = 300
eval_iters = 5
log_interval = 10
