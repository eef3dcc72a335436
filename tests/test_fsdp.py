"""
train.py --fsdp=True on CPU: 2 gloo processes under torchrun on a tiny model log the same losses as
DDP (AdamW and Muon), resume exactly from their sharded checkpoint (on 2 ranks and on 1) and from a
checkpoint saved without FSDP, survive a kill during a save, and activation checkpointing changes no loss.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import torch

from conftest import REPO
from checkpoint import load_checkpoint
from test_core import TINY, iter_losses, train, workdir  # noqa: F401 (workdir is a fixture)


def torchrun(workdir, *args, nproc=2, check=True):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           str(REPO / 'train.py'), *TINY, *args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1'))
    assert not check or proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-8000:]
    return proc


def assert_close(a, b, iters):
    # the logs print 4 decimals: 1e-3 relative is a few units in the last place at these losses
    worst = max(abs(float(a[i]) - float(b[i])) / float(a[i]) for i in iters)
    assert worst < 1e-3, [(i, a[i], b[i]) for i in iters]


def eval_losses(stdout, step):
    return [float(x) for x in re.search(rf'^step {step}: train loss ([\d.]+), val loss ([\d.]+)', stdout, re.M).groups()]


def test_fsdp_matches_ddp_and_resumes_exactly(workdir):
    ddp = iter_losses(torchrun(workdir, '--out_dir=out-ddp', '--max_iters=30', '--eval_interval=15').stdout)
    first = torchrun(workdir, '--fsdp=True', '--out_dir=out-fsdp', '--max_iters=15', '--eval_interval=15')
    assert first.stdout.count('step 15:') == 1  # only rank 0 logs
    out = workdir / 'out-fsdp'
    assert sorted(p.name for p in out.iterdir()) == ['ckpt-shards-000015', 'ckpt.pt', 'config.yaml', 'meta.pkl']
    # ckpt.pt holds the consolidated weights, for sample.py and the rest, through the one loader
    model, ckpt = load_checkpoint(out)
    assert ckpt['iter_num'] == 15 and ckpt['shards'] == 'ckpt-shards-000015' and 'optimizer' not in ckpt
    shutil.copytree(out, workdir / 'out-one')
    resumed = torchrun(workdir, '--fsdp=True', '--out_dir=out-fsdp', '--max_iters=30', '--eval_interval=15',
                       '--init_from=resume')
    fsdp = {**iter_losses(first.stdout), **iter_losses(resumed.stdout)}
    assert sorted(fsdp) == list(range(30))
    assert_close(ddp, fsdp, range(30))
    assert sorted(p.name for p in out.iterdir()) == ['ckpt-shards-000030', 'ckpt.pt', 'config.yaml', 'meta.pkl']
    # the 2-rank checkpoint resumes in one process (no torchrun): the same model at iteration 30
    one = train(workdir, '--out_dir=out-one', '--max_iters=30', '--eval_interval=15', '--init_from=resume')
    assert sorted(iter_losses(one.stdout)) == list(range(15, 30))
    assert eval_losses(one.stdout, 30) == eval_losses(resumed.stdout, 30)
    # and the checkpoint that one process wrote (no shards) resumes under FSDP: iteration 30 as the FSDP run's
    assert 'shards' not in torch.load(workdir / 'out-one' / 'ckpt.pt', weights_only=True)
    again = torchrun(workdir, '--fsdp=True', '--out_dir=out-fsdp', '--max_iters=31', '--eval_interval=15',
                     '--init_from=resume')
    switched = torchrun(workdir, '--fsdp=True', '--out_dir=out-one', '--max_iters=31', '--eval_interval=15',
                        '--init_from=resume')
    assert iter_losses(switched.stdout) == iter_losses(again.stdout) and 30 in iter_losses(again.stdout)


def test_fsdp_muon_with_activation_checkpointing_matches_ddp_and_resumes(workdir):
    muon = ['--optimizer=muon', '--eval_interval=15']
    ddp = iter_losses(torchrun(workdir, '--out_dir=out-ddp', '--max_iters=30', *muon).stdout)
    fsdp = ['--out_dir=out-fsdp', '--fsdp=True', '--activation_checkpointing=True', *muon]
    first = iter_losses(torchrun(workdir, '--max_iters=15', *fsdp).stdout)
    resumed = iter_losses(torchrun(workdir, '--max_iters=30', '--init_from=resume', *fsdp).stdout)
    assert_close(ddp, {**first, **resumed}, range(30))
    # the optimizer must match the shards' state; a damaged shard directory is one line, not a traceback
    proc = train(workdir, '--max_iters=31', '--init_from=resume', '--out_dir=out-fsdp', '--optimizer=adamw', check=False)
    assert proc.returncode == 1 and "trained with optimizer='muon'" in proc.stderr
    (workdir / 'out-fsdp' / 'ckpt-shards-000030' / '.metadata').unlink()
    proc = train(workdir, '--max_iters=31', '--init_from=resume', '--out_dir=out-fsdp', *muon, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith('error: cannot load the sharded checkpoint'), proc.stderr


def test_activation_checkpointing_keeps_dropout_losses(workdir):
    # the recomputed forward draws the same dropout masks: identical losses, not merely close
    args = ['--dropout=0.1', '--max_iters=6', '--eval_interval=6']
    plain = iter_losses(train(workdir, '--out_dir=out-a', *args).stdout)
    checkpointed = iter_losses(train(workdir, '--out_dir=out-b', '--activation_checkpointing=True', *args).stdout)
    assert plain == checkpointed and len(plain) == 6


def test_kill_during_a_sharded_save_leaves_the_previous_checkpoint(workdir):
    out = workdir / 'out-kill'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(REPO / 'train.py'),
           *TINY, '--fsdp=True', '--n_layer=4', '--n_embd=192', '--n_head=4', f'--out_dir={out}', '--eval_interval=1',
           '--eval_iters=1', '--max_iters=100000']
    for delay in (0.0, 0.05):
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1'))
        saves = 0
        for line in proc.stdout:
            saves += line.startswith('saving checkpoint')
            if saves == 2:
                break
        time.sleep(delay)
        # torchrun starts each rank in a session of its own: kill the ranks, then torchrun
        ranks = [int(pid) for pid in open(f'/proc/{proc.pid}/task/{proc.pid}/children').read().split()]
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        while any(os.path.exists(f'/proc/{pid}') and open(f'/proc/{pid}/stat').read().split()[2] != 'Z'
                  for pid in ranks):
            time.sleep(0.01)
        model, ckpt = load_checkpoint(out)
        assert ckpt['iter_num'] >= 1 and (out / ckpt['shards'] / '.metadata').exists()
    # the next run removes what the kill left half-written and resumes from the shards
    resumed = torchrun(workdir, '--fsdp=True', '--n_layer=4', '--n_embd=192', '--n_head=4', f'--out_dir={out}',
                       '--eval_interval=1', '--eval_iters=1', f'--max_iters={ckpt["iter_num"] + 1}', '--init_from=resume')
    assert sorted(iter_losses(resumed.stdout)) == [ckpt['iter_num']]
    assert not any(p.name.endswith('.tmp') for p in out.iterdir())
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == ckpt['iter_num'] + 1


def test_fsdp_needs_torchrun(workdir):
    proc = train(workdir, '--fsdp=True', '--out_dir=out-err', check=False)
    assert proc.returncode == 1 and 'torchrun' in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
