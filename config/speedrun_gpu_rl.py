# speedrun.sh's GPU run, RL: rl.py from the SFT model on GSM8K's train questions (one epoch: 7,473 / 16),
# 16 samples each, rewarded 1 for the right final answer, as nanochat's chat_rl.
init_from = 'sft'
out_dir = 'rl'
dataset = 'rl'
device = 'cuda'
dtype = 'bfloat16'
max_iters = 467
questions_per_step = 16
samples_per_question = 16
batch_size = 32
max_new_tokens = 256
temperature = 1.0
learning_rate = 5e-5
eval_interval = 60
eval_questions = 400
eval_samples = 16
log_interval = 1
