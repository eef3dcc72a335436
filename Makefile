# The quick start. Each recipe line is a plain command you can also type yourself.
.PHONY: install install-test demo test

install:
	pip install -r requirements.txt

install-test: install
	pip install -r requirements-test.txt

# prepare tiny Shakespeare, train the CPU config (a few minutes on a laptop), sample from it
demo: install
	python data/shakespeare_char/prepare.py
	python train.py config/train_shakespeare_char_cpu.py
	python sample.py --out_dir=out-shakespeare-char --device=cpu --num_samples=3 --max_new_tokens=300

test: install-test
	python -m pytest tests -q
