# speedrun.sh's CPU run, RL: rl.py from the SFT model on the products task's train questions, rewarded 1
# for the right final answer (config/rl_demo.py's settings, fewer steps).
init_from = 'sft'
out_dir = 'rl'
dataset = 'rl'
device = 'cpu'
dtype = 'float32'
max_iters = 60
questions_per_step = 16
samples_per_question = 8
max_new_tokens = 48
temperature = 1.0
learning_rate = 3e-4
eval_interval = 30
eval_questions = 100
eval_samples = 8
log_interval = 1
