# The quick start. Each recipe line is a plain command you can also type yourself.
.PHONY: install install-cpu install-test demo chat-demo tool-demo rl-demo lora-demo test

# PyTorch: pip's default build (CUDA) where an NVIDIA GPU is visible, else the CPU-only build, which
# needs no GPU libraries (a 1.25 GB virtualenv against 6.03 GB: README). TORCH_CPU=... sets what
# install-cpu asks pip for (a version pin, a wheel file)
TORCH_CPU ?= torch --index-url https://download.pytorch.org/whl/cpu

install:
	if nvidia-smi -L >/dev/null 2>&1; then pip install -r requirements.txt; else $(MAKE) install-cpu; fi

install-cpu:
	pip install $(TORCH_CPU)
	pip install -r requirements.txt

install-test: install
	pip install -r requirements-test.txt

# prepare tiny Shakespeare, train the CPU config (a few minutes on a laptop), sample from it. Every core
# trains: on a busy machine OMP_NUM_THREADS=1 python train.py ... is faster (README, Threads)
demo: install
	python data/shakespeare_char/prepare.py
	python train.py config/train_shakespeare_char_cpu.py
	python sample.py --out_dir=out-shakespeare-char --device=cpu --num_samples=3 --max_new_tokens=300

# build the chat task, train a chat model on it (minutes on 2 CPU cores), score it on held-out questions.
# A small vocabulary keeps the task's made-up words one letter a token; one thread: a model this small
# gains nothing from a second, and on a busy machine loses a lot
chat-demo: install
	python data/chat/prepare.py --task=arith --vocab_size=320
	OMP_NUM_THREADS=1 python train.py config/train_chat_demo.py
	OMP_NUM_THREADS=1 python chat_eval.py --out_dir=out-chat --device=cpu --input=data/chat/val.jsonl --min_accuracy=0.9
	@echo "chat with it:  python sample.py --out_dir=out-chat --device=cpu --chat=True --temperature=0"
	@echo "or serve it:   python serve.py --out_dir=out-chat --device=cpu   (the page's Chat tab, or POST /v1/chat/completions)"

# the built-in task's hard variant (products of 3- to 5-digit numbers), whose replies call the calculator: a chat
# model trained on it, scored on held-out questions with its calculator and without (chat_eval.py --tools=False)
tool-demo: install
	python data/chat/prepare.py --task=products --vocab_size=320
	OMP_NUM_THREADS=1 python train.py config/train_tool_demo.py
	OMP_NUM_THREADS=1 python chat_eval.py --out_dir=out-tool --device=cpu --input=data/chat/val.jsonl > out-tool/eval-tools.txt && cat out-tool/eval-tools.txt
	OMP_NUM_THREADS=1 python chat_eval.py --out_dir=out-tool --device=cpu --input=data/chat/val.jsonl --tools=False > out-tool/eval-no-tools.txt && cat out-tool/eval-no-tools.txt
	@echo "held-out: with calculator $$(sed -n 's|^accuracy \([0-9]*/[0-9]*\).*|\1|p' out-tool/eval-tools.txt), without $$(sed -n 's|^accuracy \([0-9]*/[0-9]*\).*|\1|p' out-tool/eval-no-tools.txt)"

# reinforcement learning from tool-demo's model (out-tool/) on the same task's train questions, rewarded for the
# right answer; scored on the same held-out questions before and after
rl-demo: install
	OMP_NUM_THREADS=1 python rl.py config/rl_demo.py
	OMP_NUM_THREADS=1 python chat_eval.py --out_dir=out-tool --device=cpu --input=data/chat/val.jsonl > out-rl/eval-sft.txt && cat out-rl/eval-sft.txt
	OMP_NUM_THREADS=1 python chat_eval.py --out_dir=out-rl --device=cpu --input=data/chat/val.jsonl > out-rl/eval-rl.txt && cat out-rl/eval-rl.txt
	@echo "held-out: SFT $$(sed -n 's|^accuracy \([0-9]*/[0-9]*\).*|\1|p' out-rl/eval-sft.txt), after RL $$(sed -n 's|^accuracy \([0-9]*/[0-9]*\).*|\1|p' out-rl/eval-rl.txt)"

# LoRA against full fine-tuning on the built-in task: a chat model trained 400 iterations (out-chat-base), then
# 600 more of SFT either way, each scored on the same held-out questions (docs/post-training.md has the figures)
LORA_DEMO = config/train_chat_demo.py --init_from=out-chat-base --max_iters=600 --lr_decay_iters=600 --eval_interval=600 --warmup_iters=0
lora-demo: install
	python data/chat/prepare.py --task=arith --vocab_size=320
	OMP_NUM_THREADS=1 python train.py config/train_chat_demo.py --out_dir=out-chat-base --max_iters=400 --lr_decay_iters=400 --eval_interval=400
	OMP_NUM_THREADS=1 python train.py $(LORA_DEMO) --out_dir=out-chat-full --learning_rate=1e-3 --min_lr=1e-4
	OMP_NUM_THREADS=1 python train.py $(LORA_DEMO) --out_dir=out-chat-lora --learning_rate=1e-2 --min_lr=1e-3 --lora_rank=32 --lora_alpha=64
	for m in base full lora; do OMP_NUM_THREADS=1 python chat_eval.py --out_dir=out-chat-$$m --device=cpu --input=data/chat/val.jsonl | grep '^accuracy' | sed "s/^/$$m: /"; done

# test processes: one more than the cores, as many tests wait on a script they started; each test file runs
# in one of them (its module fixtures made once)
TEST_WORKERS ?= $(shell python -c "import os; print(os.cpu_count() + 1)")
test: install-test
	python -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile
