"""
Shared test helpers. Tests run offline on CPU: the Shakespeare text and GPT-2's BPE
files come from ../shared (see its README), never from the network.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / 'shared'
SHAKESPEARE = SHARED / 'data' / 'tinyshakespeare' / 'input.txt'
GPT2_BPE = SHARED / 'gpt2_bpe'

# tiktoken reads GPT-2's BPE files from this cache instead of downloading them
os.environ.setdefault('TIKTOKEN_CACHE_DIR', str(SHARED / 'tiktoken_cache'))
os.environ.setdefault('WANDB_MODE', 'offline')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
if 'PYTEST_XDIST_WORKER' in os.environ:
    # several test processes share the cores (make test: one per core): each, and every script it starts,
    # computes on one thread, as a second would only wait for a core another worker holds
    os.environ['OMP_NUM_THREADS'] = '1'
    import torch
    torch.set_num_threads(1)
sys.path.insert(0, str(REPO))


def run_script(*args, cwd=REPO, timeout=600, check=True, env=None, input=None):
    """Run `python <args>` like a user would, from the repo root (input: its stdin); return the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def shakespeare_text():
    if not SHAKESPEARE.exists():
        pytest.skip("../shared/data/tinyshakespeare/input.txt not present")
    return SHAKESPEARE.read_text()


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine every parallel op can
    stall waiting for it: tests that run models in this process use one."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
