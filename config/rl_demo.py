# `make rl-demo`: reinforcement learning from `make tool-demo`'s model (out-tool/) on the products task's train
# questions, rewarded 1 for the right final answer; held-out pass@1/pass@8 every eval_interval steps.
# python rl.py config/rl_demo.py && python chat_eval.py --out_dir=out-rl --device=cpu --input=data/chat/val.jsonl

init_from = 'out-tool'
out_dir = 'out-rl'
dataset = 'chat'
device = 'cpu'
dtype = 'float32'
max_iters = 300
questions_per_step = 16
samples_per_question = 8
max_new_tokens = 48  # a reply is at most ~40 tokens (call, output, answer)
temperature = 1.0
learning_rate = 3e-4
eval_interval = 100
eval_questions = 100
eval_samples = 8
