"""
Progress on a terminal (a pseudo-terminal here): train.py and sample.py draw a tqdm bar. Into a pipe
they print plain lines instead (serve.py's page parses train.py's): test_core and test_sampling check
those. Tiny models, one thread.
"""
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from conftest import REPO
from test_serve import tiny_run_overrides, write_checkpoint, write_dataset

ENV = {'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}


def run_in_terminal(*args, cwd, timeout=120):
    """Run `python <args>` with stdin, stdout and stderr on a 100-column pseudo-terminal; return
    (exit code, what the terminal received)."""
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack('HHHH', 30, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, stdin=child, stdout=child, stderr=child,
                            env=dict(os.environ, PYTHONUNBUFFERED='1', **ENV))
    os.close(child)
    received = b''
    try:
        while True:
            try:
                data = os.read(parent, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            received += data
        proc.wait(timeout)
    finally:
        os.close(parent)
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, received.decode(errors='replace').replace('\r\n', '\n')


def screen_lines(text):
    # what stays on each line of a terminal: the text after the line's last carriage return
    return [line.rsplit('\r', 1)[-1] for line in text.split('\n')]


def train_args(tmp_path, max_iters):
    write_dataset(tmp_path / 'data' / 'tiny')
    return [REPO / 'train.py', *tiny_run_overrides('tiny', str(tmp_path / 'out'), max_iters=max_iters)]


def test_training_draws_a_bar_on_a_terminal(tmp_path):
    code, text = run_in_terminal(*train_args(tmp_path, 12), cwd=tmp_path)
    assert code == 0, text[-2000:]
    lines = screen_lines(text)
    # the bar: iterations, loss, tok/s and an ETA; no log lines
    assert re.search(r'training:\s+\d+%\|.*\| \d+/12 \[[\d:]+<[\d:]+, .*loss \d\.\d{4}, [\d,]+ tok/s\]', text), text
    assert not any(line.startswith('iter ') for line in lines)
    assert 'mfu' not in text  # a CPU, and no peak_flops given
    # the evaluations and checkpoint saves on lines of their own above the bar, and the finished bar last
    steps = [line for line in lines if line.startswith('step ')]
    assert [int(re.fullmatch(r'step (\d+): train loss \d\.\d{4}, val loss \d\.\d{4}(, val bpb [\d.]+)?', line).group(1))
            for line in steps] == [0, 5, 10, 12], steps
    saves = [line for line in lines if 'saving checkpoint' in line]
    assert saves and all(line == f"saving checkpoint to {tmp_path / 'out'}" for line in saves), saves
    *_, finished, done = [line for line in lines if line]
    assert re.match(r'training: 100%\|.*\| 12/12 ', finished) and done == f"done: {tmp_path / 'out'}/ckpt.pt holds iteration 12", lines[-3:]


def sample_args(tmp_path):
    return [REPO / 'sample.py', f'--out_dir={write_checkpoint(tmp_path / "out-tiny")}', '--device=cpu',
            '--dtype=float32', '--num_samples=3', '--max_new_tokens=300', '--start=the ', '--seed=3']  # long enough to redraw


def test_sampling_draws_a_bar_on_a_terminal(tmp_path):
    code, text = run_in_terminal(*sample_args(tmp_path), cwd=REPO)
    assert code == 0, text[-2000:]
    assert re.search(r'\rsampling:\s+\d+%\|.*\| \d+/900 \[[\d:]+<[\d:]+, +[\d.]+tok/s\]', text), text
    assert 'sampling: ' not in ''.join(screen_lines(text))  # the bar is gone once the samples print
    assert text.count('---------------') == 3 and '3 x 300 tokens in' in text
