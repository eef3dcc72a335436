# A small character-level Shakespeare model, the GPU version (a few minutes on one A100).
# python data/shakespeare_char/prepare.py && python train.py config/train_shakespeare_char.py

out_dir = 'out-shakespeare-char'
eval_interval = 250  # evaluate often: this small model overfits
eval_iters = 200
log_interval = 10

# save only when val improves: on this little data the model starts to overfit
always_save_checkpoint = False

wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # context of up to 256 previous characters

# a baby GPT
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # small networks can take a larger learning rate
max_iters = 5000
lr_decay_iters = 5000  # usually equal to max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # a little larger: few tokens per iteration

warmup_iters = 100
