"""
LoRA (lora.py, train.py's lora_* settings): fresh adapters compute the base, only they train, a run's
checkpoint is the adapters and the name of its base (a few percent of a full one), a resume continues
exactly, and every script's loader merges them in with the same logits. Tiny models on CPU.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

from checkpoint import load_checkpoint
from conftest import REPO, run_script
from lora import LoRALinear, add_lora, adapters_off, lora_state, merge_lora, trainable
from model import GPT, GPTConfig
from test_core import TINY, iter_losses, train, workdir  # noqa: F401 (workdir is a fixture)

WIDE = ['--n_embd=64', '--n_head=2', '--n_layer=2']


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, bias=True), **kw}))


@pytest.mark.parametrize('targets', ['attn', 'mlp', 'all'])
def test_fresh_adapters_compute_the_base_and_merge_exactly(targets, one_thread):
    model = tiny().eval()
    x = torch.randint(50, (2, 16))
    base = model(x, x)[0]
    add_lora(model, rank=4, alpha=8, targets=targets)
    assert torch.equal(model(x, x)[0], base)  # B starts at zero: step 0 is the base, bit for bit
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 2 * (2 if targets != 'all' else 4) and all(t in n for n in adapted for t in
                                                                       [{'attn': 'attn.', 'mlp': 'mlp.'}.get(targets, '')])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()
    adapted_logits = model(x, x)[0]
    assert (adapted_logits - base).abs().max() > 1e-2
    with adapters_off(model):
        assert torch.equal(model(x, x)[0], base)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(x, x)[0], adapted_logits, atol=1e-5, rtol=1e-5)


def test_only_the_adapters_train(one_thread):
    model = tiny(dropout=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, rank=2, alpha=4, dropout=0.1)
    n_trained, n_all = trainable(model)
    assert n_trained == sum(v.numel() for k, v in lora_state(model).items() if not k.endswith('lora_scaling'))
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu')
    assert sum(p.numel() for g in opt.param_groups for p in g['params']) == n_trained
    x = torch.randint(50, (4, 16))
    for _ in range(3):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base: untouched
    assert all(m.lora_B.abs().max() > 0 for m in model.modules() if isinstance(m, LoRALinear))


def checkpoint_bytes(out):
    return os.path.getsize(out / 'ckpt.pt')


def test_lora_run_checkpoint_resume_and_loaders(workdir, one_thread):
    train(workdir, *WIDE, '--out_dir=base', '--max_iters=2', '--eval_interval=2')
    lora = [*WIDE, '--lora_rank=2', '--lora_alpha=4', '--eval_interval=3', '--learning_rate=1e-2']
    whole = train(workdir, *lora, '--init_from=base', '--out_dir=a', '--max_iters=6')
    assert 'LoRA adapters of rank 2 over the frozen' in whole.stdout and 'peak memory over the first two steps' in whole.stdout
    trained, total = map(lambda s: int(s.replace(',', '')),
                         whole.stdout.split('trainable parameters: ')[1].split(' (')[0].split(' of '))
    assert trained / total < 0.1
    ckpt = torch.load(workdir / 'a' / 'ckpt.pt', weights_only=True)
    assert set(k.rpartition('.')[2] for k in ckpt['model']) == {'lora_A', 'lora_B', 'lora_scaling'}
    assert ckpt['lora']['base'] == str(workdir / 'base') and ckpt['lora']['rank'] == 2
    # adapters and their AdamW moments against weights and theirs: a few percent
    assert checkpoint_bytes(workdir / 'a') < 0.1 * checkpoint_bytes(workdir / 'base')
    # interrupted at 3 and resumed: the same losses as the run that went through
    train(workdir, *lora, '--init_from=base', '--out_dir=b', '--max_iters=3')
    resumed = train(workdir, *lora, '--init_from=resume', '--out_dir=b', '--max_iters=6')
    a, b = iter_losses(whole.stdout), iter_losses(resumed.stdout)
    assert [a[i] for i in (3, 4, 5)] == [b[i] for i in (3, 4, 5)]
    assert torch.load(workdir / 'b' / 'ckpt.pt', weights_only=True)['lora']['rank'] == 2
    # the loader: merged (what sample.py, chat_eval.py and serve.py get) computes what the adapters do
    attached, _ = load_checkpoint(str(workdir / 'a'), merge=False)
    merged, info = load_checkpoint(str(workdir / 'a'))
    assert any(isinstance(m, LoRALinear) for m in attached.modules())
    assert not any(isinstance(m, LoRALinear) for m in merged.modules()) and info['iter_num'] == 6
    x = torch.randint(merged.config.vocab_size, (2, 32))
    torch.testing.assert_close(merged.eval()(x, x)[0], attached.eval()(x, x)[0], atol=1e-5, rtol=1e-5)
    base, _ = load_checkpoint(str(workdir / 'base'))
    assert (merged.eval()(x, x)[0] - base.eval()(x, x)[0]).abs().max() > 1e-3  # the adapters did learn
    # DDP: 2 gloo processes train the same adapters as one process with 2 micro-steps
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                str(REPO / 'train.py'), *TINY, *lora, '--init_from=base', '--out_dir=ddp', '--max_iters=3']
    proc = subprocess.run(torchrun, cwd=workdir, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = re.search(r'step 3: train loss ([\d.]+), val loss ([\d.]+)', whole.stdout).groups()
    ddp = re.search(r'step 3: train loss ([\d.]+), val loss ([\d.]+)', proc.stdout).groups()
    assert all(abs(float(x) - float(y)) < 2e-3 for x, y in zip(single, ddp)), (single, ddp)
    proc = run_script(REPO / 'sample.py', '--out_dir=a', '--device=cpu', '--dtype=float32', '--num_samples=1',
                      '--max_new_tokens=5', '--start=To', cwd=workdir, env={'PYTHONPATH': str(REPO)})
    assert proc.stdout.strip()


def test_lora_settings_that_cannot_work_are_one_line(workdir):
    for args, message in [(['--lora_rank=2'], 'lora_rank trains adapters over a base model'),
                          (['--lora_rank=2', '--init_from=base', '--lora_targets=heads'], 'lora_targets must be one of'),
                          (['--lora_rank=2', '--init_from=base', '--lora_alpha=0'], 'lora_alpha must be > 0')]:
        proc = train(workdir, *args, '--out_dir=x', '--max_iters=1', check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
