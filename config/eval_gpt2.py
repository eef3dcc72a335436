# Evaluate OpenAI's GPT-2 (124M) on OpenWebText's val split, then exit.
# python train.py config/eval_gpt2.py
batch_size = 8
eval_iters = 500  # use more iterations to get a good estimate
eval_only = True
wandb_log = False
init_from = 'gpt2'
