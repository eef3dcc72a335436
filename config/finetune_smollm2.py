# Fine-tune SmolLM2-135M-Instruct, a Llama-architecture chat model from the Hugging Face hub (downloaded
# once), on conversations rendered in its own chat template, with the loss on its replies only.
# python data/chat/prepare.py --task=arith --template_from=HuggingFaceTB/SmolLM2-135M-Instruct --dataset=chat_smollm2
# python train.py config/finetune_smollm2.py
# python chat_eval.py --out_dir=out-smollm2 --input=data/chat_smollm2/val.jsonl
# python sample.py --out_dir=out-smollm2 --chat=True --temperature=0
# (--input=conversations.jsonl instead of --task=arith: your own conversations)

init_from = 'HuggingFaceTB/SmolLM2-135M-Instruct'
out_dir = 'out-smollm2'
dataset = 'chat_smollm2'
eval_interval = 50
eval_iters = 20
log_interval = 10
always_save_checkpoint = False  # only when the val loss improves

# every window starts at a conversation (its default system prompt, a question, a reply); the model keeps
# the context its config.json gives it. 8 * 4 windows of 256 tokens = 8,192 tokens per iteration
block_size = 256
batch_size = 8
gradient_accumulation_steps = 4
max_iters = 300

# fine-tune at a constant, small learning rate
learning_rate = 3e-5
decay_lr = False
weight_decay = 0.0
