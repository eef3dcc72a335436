"""
The core: GPT-2 weights through from_pretrained, prepare -> train -> sample, exact resume,
crash-safe checkpoints, DDP on CPU with gloo, wandb offline, nanoGPT checkpoint compatibility
and the one-line errors. Training runs use a tiny model on a small slice of Shakespeare in a
temporary directory (train.py reads data/<dataset>/ relative to its working directory).
"""
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_script
from engine import generate
from model import GPT, GPTConfig

TINY = ['--device=cpu', '--compile=False', '--dtype=float32', '--n_layer=2', '--n_head=2', '--n_embd=32',
        '--block_size=32', '--batch_size=4', '--eval_iters=2', '--log_interval=1', '--warmup_iters=2',
        '--learning_rate=1e-3', '--min_lr=1e-4', '--gradient_accumulation_steps=2', '--dataset=tiny']


@pytest.fixture
def workdir(tmp_path, shakespeare_text):
    """tmp_path with data/tiny/{train,val}.bin and meta.pkl made by the real char prepare.py."""
    prep = tmp_path / 'data' / 'tiny'
    prep.mkdir(parents=True)
    (prep / 'input.txt').write_text(shakespeare_text[:60000])
    run_script(REPO / 'data' / 'shakespeare_char' / 'prepare.py', f'--out_dir={prep}', cwd=tmp_path,
               env={'PYTHONPATH': str(REPO)})
    return tmp_path


def train(workdir, *args, check=True, env=None):
    return run_script(REPO / 'train.py', *TINY, *args, cwd=workdir, check=check,
                      env={'PYTHONPATH': str(REPO), **(env or {})})


def ckpt_iter(out):
    return torch.load(out / 'ckpt.pt', weights_only=True)['iter_num']


def iter_losses(stdout):
    return {int(m.group(1)): m.group(2) for m in re.finditer(r'^iter (\d+): loss (\d+\.\d+)', stdout, re.M)}


# ---------------------------------------------------------------------------------------------
# from_pretrained against transformers

@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('gpt2-tiny')
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=500)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def test_from_pretrained_matches_transformers(hf_dir):
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ours = GPT.from_pretrained(str(hf_dir)).eval()
    assert ours.config.gelu_approximate == 'tanh'
    idx = torch.randint(0, 500, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits[:, -1, :]
        got, _ = ours(idx)
    rel = ((got[:, -1, :] - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, rel
    # identical greedy tokens through the engine (top_k=1 is greedy)
    prompt = idx[:1, :8]
    with torch.no_grad():
        hf_out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                             pad_token_id=0)
    ours_out = generate(ours, prompt.tolist(), 30, top_k=1)
    assert hf_out[0, 8:].tolist() == ours_out[0]


def test_from_pretrained_in_train_and_sample(hf_dir, workdir):
    # a local transformers directory works as init_from in train.py and sample.py
    out = workdir / 'out-ft'
    proc = train(workdir, f'--init_from={hf_dir}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2',
                 '--dataset=tiny', '--block_size=32')
    assert 'Initializing from OpenAI GPT-2 weights' in proc.stdout
    ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
    assert ckpt['model_args']['block_size'] == 32 and ckpt['gelu_approximate'] == 'tanh'
    # block_size above the pretrained model's: a one-line error
    proc = train(workdir, f'--init_from={hf_dir}', f'--out_dir={out}', '--block_size=128', check=False)
    assert proc.returncode == 1 and 'larger than the model' in proc.stderr and 'Traceback' not in proc.stderr


# ---------------------------------------------------------------------------------------------
# prepare -> train -> sample

def test_char_prepare_train_sample(workdir):
    out = workdir / 'out'
    proc = train(workdir, f'--out_dir={out}', '--max_iters=30', '--eval_interval=15')
    assert re.search(r'^step 15: train loss \d\.\d{4}, val loss \d\.\d{4}(, val bpb \d+\.\d{4})?$', proc.stdout, re.M)
    losses = iter_losses(proc.stdout)
    assert sorted(losses) == list(range(30))  # max_iters iterations, then the final evaluation and checkpoint
    assert float(losses[29]) < float(losses[0])
    assert ckpt_iter(out) == 30 and re.search(r'^step 30: train loss', proc.stdout, re.M)
    # into a pipe: nanoGPT's log lines, no progress bar, and no MFU on a CPU without its peak_flops
    assert re.search(r'^iter 10: loss \d\.\d{4}, time [\d.]+ms, [\d,]+ tok/s$', proc.stdout, re.M)
    assert '\r' not in proc.stdout and 'mfu' not in proc.stdout
    assert (out / 'meta.pkl').exists()  # the out_dir is self-contained
    ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
    assert set(ckpt) >= {'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config'}
    assert not any(k.startswith('_orig_mod.') for k in ckpt['model'])
    # a default model records only nanoGPT's keys, so nanoGPT's GPTConfig(**model_args) accepts it
    assert set(ckpt['model_args']) == {'n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout'}
    # sample from the out_dir alone (the dataset folder is not needed)
    shutil.rmtree(workdir / 'data')
    proc = run_script(REPO / 'sample.py', f'--out_dir={out}', '--device=cpu', '--num_samples=2',
                      '--max_new_tokens=40', '--start=ROMEO:', cwd=workdir)
    samples = proc.stdout.split('---------------')
    assert len(samples) == 3 and samples[0].split('ROMEO:', 1)[1].strip()


def test_exact_resume(workdir):
    common = ['--dropout=0.1', '--eval_interval=20', '--always_save_checkpoint=True']
    straight = train(workdir, '--out_dir=out-a', '--max_iters=40', *common)
    train(workdir, '--out_dir=out-b', '--max_iters=20', *common)
    resumed = train(workdir, '--out_dir=out-b', '--max_iters=40', '--init_from=resume', *common)
    a, b = iter_losses(straight.stdout), iter_losses(resumed.stdout)
    assert sorted(b) == list(range(20, 40)) and [a[i] for i in range(20, 40)] == [b[i] for i in range(20, 40)]


def test_resume_without_checkpoint_fails_cleanly(workdir):
    proc = train(workdir, '--out_dir=nothing-here', '--init_from=resume', check=False)
    assert proc.returncode == 1 and 'no checkpoint' in proc.stderr and 'Traceback' not in proc.stderr


def test_sigkill_during_checkpointing_leaves_a_loadable_checkpoint(workdir):
    # a model whose checkpoint takes a while to write, saved every iteration, killed at
    # moments spread over the writes: ckpt.pt must always load
    out = workdir / 'out-kill'
    args = [sys.executable, str(REPO / 'train.py'), *TINY, '--n_layer=4', '--n_embd=192', '--n_head=4',
            f'--out_dir={out}', '--eval_interval=1', '--eval_iters=1', '--max_iters=100000',
            '--always_save_checkpoint=True']
    env = dict(os.environ, PYTHONPATH=str(REPO))
    kills = 0
    for delay in (0.0, 0.017, 0.041):
        proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in proc.stdout:  # wait for the first checkpoint, then kill a little later
            if line.startswith('saving checkpoint'):
                break
        for line in proc.stdout:
            if line.startswith('saving checkpoint'):
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
        kills += 1
        ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
        assert ckpt['iter_num'] >= 1
        model = GPT(GPTConfig(**ckpt['model_args']))
        model.load_state_dict(ckpt['model'])
    assert kills == 3


def test_torchrun_ddp_gloo_matches_single_process(workdir):
    # 2 processes with gradient_accumulation_steps=2 (1 each) see the same global batch as one
    # process with 2 micro-steps: the evaluated losses must agree
    single = train(workdir, '--out_dir=out-single', '--max_iters=10', '--eval_interval=10')
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                str(REPO / 'train.py'), *TINY, '--out_dir=out-ddp', '--max_iters=10', '--eval_interval=10']
    proc = subprocess.run(torchrun, cwd=workdir, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('step 10:') == 1  # only rank 0 logs
    s = re.search(r'step 10: train loss ([\d.]+), val loss ([\d.]+)', single.stdout).groups()
    d = re.search(r'step 10: train loss ([\d.]+), val loss ([\d.]+)', proc.stdout).groups()
    assert all(abs(float(x) - float(y)) < 2e-3 for x, y in zip(s, d)), (s, d)
    assert (workdir / 'out-ddp' / 'ckpt.pt').exists()


def test_wandb_offline(workdir):
    proc = train(workdir, '--out_dir=out-wandb', '--max_iters=4', '--eval_interval=2', '--wandb_log=True',
                 '--wandb_project=test', '--wandb_run_name=tiny', env={'WANDB_MODE': 'offline', 'WANDB_DIR': str(workdir)})
    runs = list((workdir / 'wandb').glob('offline-run-*'))
    assert runs, proc.stdout[-2000:]
    assert any(runs[0].rglob('*.wandb'))


def test_compile_without_a_working_compiler_trains_without_it(workdir):
    # the no-Triton / no-C++-compiler case: one line saying so, then an ordinary run
    proc = train(workdir, '--out_dir=out-nocc', '--max_iters=2', '--eval_interval=2', '--compile=True',
                 env={'CXX': '/nonexistent/g++'})
    lines = [line for line in proc.stderr.splitlines() if 'torch.compile does not work here' in line]
    assert len(lines) == 1 and lines[0].endswith('running without it'), proc.stderr[-2000:]
    assert set(iter_losses(proc.stdout)) == {0, 1} and ckpt_iter(workdir / 'out-nocc') == 2


# ---------------------------------------------------------------------------------------------
# nanoGPT compatibility and errors

def test_nanogpt_checkpoint_loads_in_sample(workdir):
    # what nanoGPT's train.py writes: 7 model_args, a compiled model's '_orig_mod.' prefixes,
    # and no meta.pkl in out_dir (sample.py must find data/<dataset>/meta.pkl from the config)
    with open(workdir / 'data' / 'tiny' / 'meta.pkl', 'rb') as f:
        vocab = pickle.load(f)['vocab_size']
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=vocab, dropout=0.0)
    model = GPT(GPTConfig(**args))
    out = workdir / 'out-nanogpt'
    out.mkdir()
    torch.save({'model': {'_orig_mod.' + k: v for k, v in model.state_dict().items()}, 'optimizer': {},
                'model_args': args, 'iter_num': 5, 'best_val_loss': torch.tensor(2.5),
                'config': {'dataset': 'tiny'}}, out / 'ckpt.pt')
    proc = run_script(REPO / 'sample.py', f'--out_dir={out}', '--device=cpu', '--num_samples=1',
                      '--max_new_tokens=20', cwd=workdir)
    assert 'Loading meta from data/tiny/meta.pkl' in proc.stderr
    assert proc.stdout.count('---------------') == 1


@pytest.mark.parametrize('case', ['missing_data', 'too_small', 'bad_key', 'bad_type'])
def test_train_errors_are_one_line(workdir, case):
    args = {'missing_data': ['--dataset=nonexistent'], 'too_small': ['--block_size=100000'],
            'bad_key': ['--n_layers=3'], 'bad_type': ['--max_iters=many']}[case]
    proc = train(workdir, '--out_dir=out-err', *args, check=False)
    assert proc.returncode == 1
    assert 'Traceback' not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    expected = {'missing_data': 'data/shakespeare_char/prepare.py' if False else 'prepare.py',
                'too_small': 'too few', 'bad_key': "did you mean 'n_layer'", 'bad_type': 'max_iters'}[case]
    assert expected in proc.stderr
    assert not (workdir / 'out-err' / 'ckpt.pt').exists()
