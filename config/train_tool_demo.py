# `make tool-demo`: a chat model that calls the calculator for the built-in task's hard variant
# (data/chat/prepare.py --task=products: products of two 3- to 5-digit numbers), fine-tuned from scratch with the
# loss on the assistant's own tokens only (the calculator's outputs are not learned: the engine feeds them).
# make chat-demo's model and schedule at a third of its learning rate: at 3e-3 the model miscopied numbers
# (the operands into its call, the calculator's output into its answer) in 3% and 18% of the held-out replies
# of two runs; at 1e-3 in 1 of 500.
# python data/chat/prepare.py --task=products --vocab_size=320 && python train.py config/train_tool_demo.py

exec(open('config/train_chat_demo.py').read())

out_dir = 'out-tool'
log_interval = 50
learning_rate = 1e-3
min_lr = 1e-4
