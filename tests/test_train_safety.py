"""
train.py never leaves a mess: a save on a full disk and an interrupt (SIGINT, SIGTERM) leave no
temporary file and the previous checkpoint loadable; one run per out_dir, with a stale lock
taken over; a changed architecture on resume is an error naming the setting; an unwritable
out_dir is one line before any work; lr_decay_iters == warmup_iters trains. Tiny models on CPU.
"""
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_script
from model import GPT, GPTConfig
from test_core import TINY, iter_losses, train, workdir  # noqa: F401 (workdir is a fixture)

# saves a few MB each: big enough that a save takes a while, so interrupts land inside some of them
SLOW_SAVE = ['--n_layer=4', '--n_embd=192', '--n_head=4', '--eval_interval=1', '--eval_iters=1',
             '--always_save_checkpoint=True']


def start(workdir, *args):
    return subprocess.Popen([sys.executable, str(REPO / 'train.py'), *TINY, *args], cwd=workdir,
                            env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED='1'),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc, prefix):
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"train.py ended before printing '{prefix}': {proc.stderr.read()[-2000:]}")


def leftovers(out):
    return sorted(p.name for p in out.iterdir() if p.name.endswith('.tmp') or p.name == 'train.lock')


def load_checkpoint(out):
    ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
    GPT(GPTConfig(**ckpt['model_args'])).load_state_dict(ckpt['model'])
    return ckpt


def one_line_error(proc):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-3000:]
    return lines[0]


@contextlib.contextmanager
def mounted_tmpfs(path, options):
    """A small tmpfs at `path`, or a skip where this process may not mount one (not root)."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(['umount', '-l', str(path)], check=True)


# runs train.py with a torch.save whose second call writes a little, then fails as a full disk
# would, or is interrupted by a Ctrl-C (through the real torch.save, which turns the KeyboardInterrupt
# raised inside its writer into a RuntimeError)
BROKEN_SAVE = '''
import errno, os, runpy, signal, sys
import torch
real_save, calls = torch.save, []

class InterruptedFile:
    def __init__(self, f):
        self.f, self.writes = f, 0
    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return self.f.write(data)
    def flush(self):
        self.f.flush()

def save(obj, f, *args, **kwargs):
    calls.append(obj)
    if len(calls) >= 2 and os.environ['BREAK_SAVE'] == 'sigint':
        return real_save(obj, InterruptedFile(f), *args, **kwargs)
    if len(calls) >= 2:
        f.write(b'the first bytes of a checkpoint')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_save(obj, f, *args, **kwargs)

torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def train_with_broken_save(workdir, how, *args):
    (workdir / 'broken_save.py').write_text(BROKEN_SAVE)
    return run_script(workdir / 'broken_save.py', REPO / 'train.py', *TINY, *args, cwd=workdir, check=False,
                      env={'PYTHONPATH': str(REPO), 'BREAK_SAVE': how})


@pytest.mark.parametrize('disk', ['tmpfs', 'patched_save'])
def test_save_on_a_full_disk(workdir, disk):
    # the tiny model's checkpoint is ~350 KB: a 600 KB tmpfs holds one, not a second beside it
    with contextlib.ExitStack() as stack:
        if disk == 'tmpfs':
            out = stack.enter_context(mounted_tmpfs(workdir / 'full', 'size=600k'))
            proc = train(workdir, f'--out_dir={out}', '--max_iters=20', '--eval_interval=5', check=False)
        else:
            out = workdir / 'full'
            proc = train_with_broken_save(workdir, 'enospc', f'--out_dir={out}', '--max_iters=20', '--eval_interval=5')
        error = one_line_error(proc)
        assert 'No space left on device' in error and f'{out}/ckpt.pt holds iteration 5' in error, error
        assert re.search(r'needs \d+ KB, [\d.]+ [KM]B free', error), error
        assert leftovers(out) == []
        assert load_checkpoint(out)['iter_num'] == 5
        # resume: the checkpoint just loaded is not written again at iteration 5; the run's last, at 8, is
        inode = os.stat(out / 'ckpt.pt').st_ino
        resumed = train(workdir, f'--out_dir={out}', '--init_from=resume', '--max_iters=8', '--eval_interval=5',
                        check=False)
        assert sorted(iter_losses(resumed.stdout)) == [5, 6, 7] and resumed.stdout.count('saving checkpoint') == 1
        if disk == 'tmpfs':  # on the full disk that one does not fit either: one line, iteration 5 kept whole
            assert f'{out}/ckpt.pt holds iteration 5' in one_line_error(resumed)
            assert os.stat(out / 'ckpt.pt').st_ino == inode
        else:
            assert resumed.returncode == 0 and load_checkpoint(out)['iter_num'] == 8
        assert leftovers(out) == []


def test_interrupt_inside_a_save(workdir):
    out = workdir / 'out-int'
    proc = train_with_broken_save(workdir, 'sigint', f'--out_dir={out}', '--max_iters=20', '--eval_interval=5')
    assert proc.returncode == 130 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    # the save that was interrupted finishes first, then the run ends
    assert proc.stdout.strip().splitlines()[-1] == f'interrupted at iteration 10; {out}/ckpt.pt holds iteration 10'
    assert leftovers(out) == [] and load_checkpoint(out)['iter_num'] == 10


def test_interrupts_at_random_moments(workdir):
    out = workdir / 'out-int'
    rng = random.Random(13)
    for attempt in range(5):
        proc = start(workdir, f'--out_dir={out}', '--max_iters=100000', *SLOW_SAVE,
                     *(['--init_from=resume'] if attempt else []))
        wait_for(proc, 'saving checkpoint')
        if attempt == 0:  # the first save may still be running: wait for the next, so one is on disk
            wait_for(proc, 'saving checkpoint')
        delay = rng.uniform(0.0, 0.3)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        last = stdout.strip().splitlines()[-1]
        assert proc.returncode == 130 and 'Traceback' not in stderr, (delay, stderr[-3000:])
        m = re.fullmatch(rf'interrupted at iteration (\d+); {out}/ckpt.pt holds iteration (\d+)', last)
        assert m, (delay, last)
        assert leftovers(out) == [], delay
        assert load_checkpoint(out)['iter_num'] == int(m.group(2)) <= int(m.group(1))


def test_one_run_per_out_dir(workdir):
    out = workdir / 'out-lock'
    first = start(workdir, f'--out_dir={out}', '--max_iters=100000', '--eval_interval=1000')
    wait_for(first, 'iter 1:')
    second = train(workdir, f'--out_dir={out}', '--max_iters=2', check=False)
    # refused right after the settings are read: before any data, model or checkpoint is touched
    assert not any(w in second.stdout for w in ('vocab_size', 'Initializing', 'tokens per iteration')), second.stdout
    error = one_line_error(second)
    assert f'pid {first.pid}' in error and 'in use' in error, error
    first.send_signal(signal.SIGTERM)  # as a job scheduler stops a run
    stdout, _ = first.communicate(timeout=300)  # generous: a busy machine's scheduling, not the run, sets it
    assert first.returncode == 143 and stdout.strip().splitlines()[-1].startswith('interrupted at iteration ')
    assert leftovers(out) == []
    # a run killed outright leaves its lock file and a temporary checkpoint: the next run takes over both
    killed = start(workdir, f'--out_dir={out}', '--max_iters=100000', '--eval_interval=1000')
    wait_for(killed, 'iter 1:')
    killed.kill()
    killed.communicate()
    (out / 'ckpt.pt.12345.tmp').write_bytes(b'half a checkpoint')
    assert leftovers(out) == ['ckpt.pt.12345.tmp', 'train.lock']
    proc = train(workdir, f'--out_dir={out}', '--max_iters=2', '--eval_interval=2')
    assert f'removed {out}/ckpt.pt.12345.tmp' in proc.stdout
    assert leftovers(out) == [] and load_checkpoint(out)['iter_num'] == 2


def test_resume_keeps_the_checkpoints_architecture(workdir):
    out = workdir / 'out-arch'
    train(workdir, f'--out_dir={out}', '--max_iters=4', '--eval_interval=2')
    proc = train(workdir, f'--out_dir={out}', '--init_from=resume', '--n_layer=3', '--max_iters=6', check=False)
    error = one_line_error(proc)
    assert 'n_layer=3 (checkpoint: 2)' in error, error
    # architecture settings left at their defaults come from the checkpoint, and its config records them;
    # training settings may change
    training_only = [a for a in TINY if not a.startswith(('--n_layer', '--n_head', '--n_embd', '--block_size'))]
    proc = run_script(REPO / 'train.py', *training_only, f'--out_dir={out}', '--init_from=resume', '--max_iters=6',
                      '--eval_interval=2', '--learning_rate=5e-4', cwd=workdir, env={'PYTHONPATH': str(REPO)})
    assert sorted(iter_losses(proc.stdout)) == [4, 5]
    ckpt = load_checkpoint(out)
    assert ckpt['iter_num'] == 6 and ckpt['config']['learning_rate'] == 5e-4
    assert (ckpt['config']['n_layer'], ckpt['config']['n_embd'], ckpt['config']['block_size']) == (2, 32, 32)


@pytest.mark.parametrize('case', ['under_a_file', 'proc', 'read_only'])
def test_unwritable_out_dir_is_one_line_before_any_work(workdir, case):
    (workdir / 'a_file').write_text('')
    with contextlib.ExitStack() as stack:
        out = {'under_a_file': workdir / 'a_file' / 'out', 'proc': '/proc/out'}.get(case)
        if case == 'read_only':
            out = stack.enter_context(mounted_tmpfs(workdir / 'ro', 'size=100k,ro'))
        # a missing dataset would be the next error: the out_dir's comes first
        error = one_line_error(train(workdir, f'--out_dir={out}', '--dataset=missing', check=False))
    assert error.startswith(f"error: cannot write to out_dir '{out}'"), error


def test_lr_decay_iters_at_warmup_iters_and_mfu_once_measured(workdir):
    # warmup, then min_lr (it divided by zero at iteration 3)
    proc = train(workdir, '--out_dir=out-lr', '--warmup_iters=3', '--lr_decay_iters=3', '--max_iters=7',
                 '--eval_interval=7', '--peak_flops=1e12')  # on a CPU, MFU only against a peak the user gives
    assert sorted(iter_losses(proc.stdout)) == list(range(7))
    iters = [line for line in proc.stdout.splitlines() if line.startswith('iter ')]
    assert not any('mfu' in line for line in iters[:5]) and all(re.search(r'mfu \d', line) for line in iters[5:])


def test_config_yaml_reruns_the_run(workdir):
    """Every save writes the run's resolved settings beside ckpt.pt as config.yaml; train.py reads it back
    as a config file and trains the same run (the same losses)."""
    first = train(workdir, '--out_dir=out-yaml', '--max_iters=4', '--eval_interval=2', '--learning_rate=2e-3')
    config = (workdir / 'out-yaml' / 'config.yaml').read_text()
    assert config.startswith('# the settings of this run: python train.py out-yaml/config.yaml')
    assert 'learning_rate: 0.002' in config and 'max_iters: 4' in config
    again = run_script(REPO / 'train.py', 'out-yaml/config.yaml', '--out_dir=out-yaml-again', cwd=workdir,
                       env={'PYTHONPATH': str(REPO)})
    assert iter_losses(again.stdout) == iter_losses(first.stdout) and len(iter_losses(first.stdout)) == 4
