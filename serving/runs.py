"""
Training runs started from serve.py's page: train.py as a subprocess, one at a time, its log read piece by
piece. A run stays in the project: its out_dir under the root it is given, its dataset a folder of data/,
no weights from a path, and a model that fits in the memory this machine has free.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import torch

from configurator import check_value, settings_in
from model import GPTConfig, training_memory
from serving.api import APIError, require
from tokenizer import read_meta


def is_under(path, root):
    """Whether `path` (relative to the working directory) is `root` or inside it, links resolved."""
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def check_override(arg, settings, root, here):
    """--key=value for a known setting, of the setting's type; and a run from the page stays in the project:
    its out_dir under `root`, its dataset a folder of data/, no weights from a path."""
    match = re.fullmatch(r'--([A-Za-z_]\w*)=(.*)', arg) if isinstance(arg, str) else None
    require(match, f"override {arg!r} is not of the form --key=value", 'overrides')
    try:
        key, value = match.group(1), check_value(settings, *match.groups())
    except ValueError as e:
        raise APIError(str(e), 'overrides')
    require(key != 'out_dir' or is_under(os.path.join(root, value), root), f"out_dir must be a folder under {root}",
            'overrides')
    require(key != 'dataset' or re.fullmatch(r'\w[\w.-]*', value) and os.path.isdir(os.path.join(here, 'data', value)),
            f"dataset must be the name of a folder in data/, not {value!r}", 'overrides')
    require(key != 'init_from' or re.fullmatch(r'scratch|resume|gpt2(-medium|-large|-xl)?', value),
            "init_from must be 'scratch', 'resume' or a GPT-2 name", 'overrides')


def resolved_settings(argv, here):
    """train.py's settings once a config file and overrides apply, as train.py will see them. A config file
    is Python that may exec another by a path relative to the project: worked out in a child process there."""
    code = ("import json, sys; from configurator import configure, settings_in; s = settings_in('train.py'); "
            "configure(s, sys.argv[1:]); print(); print(json.dumps(s))")
    try:
        child = subprocess.run([sys.executable, '-c', code, *argv], cwd=here, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise APIError("the config file did not finish within 60 seconds", 'config')
    require(child.returncode == 0, f"the config does not apply: {(child.stderr.strip().splitlines() or ['?'])[-1]}",
            'config')
    return json.loads(child.stdout.strip().splitlines()[-1])


GPT2_SHAPES = {'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024), 'gpt2-large': (36, 20, 1280),
               'gpt2-xl': (48, 25, 1600)}  # (n_layer, n_head, n_embd) of OpenAI's checkpoints


def check_training_memory(values, here):
    """A 400 with the estimate when the run's model could not train in the memory this machine has free."""
    arch = {k: values[k] for k in GPTConfig.__dataclass_fields__ if k in values}
    meta_path = os.path.join(here, 'data', values['dataset'], 'meta.pkl')
    try:
        meta = read_meta(meta_path) if os.path.exists(meta_path) else {}
    except ValueError as e:
        raise APIError(str(e), 'overrides')
    arch['vocab_size'] = meta['vocab_size'] if 'vocab_size' in meta and meta.get('tokenizer') != 'gpt2' else 50304
    if values['init_from'] in GPT2_SHAPES:
        arch.update(zip(('n_layer', 'n_head', 'n_embd'), GPT2_SHAPES[values['init_from']]), bias=True, n_kv_head=0,
                    block_size=min(values['block_size'], 1024))
    try:
        need = training_memory(GPTConfig(**arch), values['batch_size'])
    except (AssertionError, TypeError, ValueError) as e:
        raise APIError(f"invalid model settings: {e}", 'overrides')
    device = values['device']
    if device.startswith('cuda') and torch.cuda.is_available():
        free, where = torch.cuda.mem_get_info(torch.device(device))[0], 'on the GPU'
    else:
        free, where = available_memory(), 'in RAM'
    require(need <= free, f"this run would need about {need / 1e9:.1f} GB to train (weights, gradients, AdamW's state and "
            f"the activations of batch_size={values['batch_size']}); {free / 1e9:.1f} GB is free {where}: choose a "
            f"smaller model or batch", 'overrides', code='too_large')


def available_memory():
    """Bytes of memory free for a new process (Linux's MemAvailable; elsewhere all of it)."""
    try:
        with open('/proc/meminfo') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    except (OSError, StopIteration, ValueError):
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


class TrainRun:
    """At most one train.py subprocess, started from the page. Its stdout and stderr go to a log file, which
    the page reads piece by piece. `here` is the project's folder (train.py, config/, data/), `root` the
    folder every run writes under."""

    def __init__(self, here, root):
        self.here, self.root = here, os.path.realpath(root)
        self.lock = threading.Lock()
        self.proc = self.run_id = self.log_path = self.command = self.started = None

    def configs(self):
        names = os.listdir(os.path.join(self.here, 'config'))
        return sorted(f for f in names if f.endswith('.py') and not f.startswith('_'))

    def start(self, config_name, overrides):
        require(isinstance(config_name, str) and config_name in self.configs(),
                f"'config' must name a file in config/, not {config_name!r}", 'config')
        require(isinstance(overrides, list) and len(overrides) <= 100,
                "'overrides' must be a list of --key=value strings", 'overrides')
        settings = settings_in(os.path.join(self.here, 'train.py'))
        for arg in overrides:
            check_override(arg, settings, self.root, self.here)
        argv = [os.path.join('config', config_name), *overrides]
        values = resolved_settings(argv, self.here)
        # whatever the config file says, the run writes under root: its out_dir is taken from there
        run_dir = os.path.realpath(os.path.join(self.root, values['out_dir']))
        require(is_under(run_dir, self.root), f"the config's out_dir {values['out_dir']!r} is not under {self.root}: set --out_dir",
                'overrides')
        check_training_memory(values, self.here)
        with self.lock:
            require(self.proc is None or self.proc.poll() is not None,
                    "a training run is already running; stop it first", status=409, code='busy')
            self.remove_log()
            # an argument list, never a shell: the overrides reach train.py exactly as written
            self.command = [sys.executable, 'train.py', *argv, f'--out_dir={run_dir}']
            with tempfile.NamedTemporaryFile('wb', prefix='nanogpt-train-', suffix='.log', delete=False) as log:
                log.write(('$ python ' + ' '.join(self.command[1:]) + '\n').encode())
                log.flush()
                # its own session: a Ctrl-C meant for the server does not hit the run directly
                self.proc = subprocess.Popen(self.command, cwd=self.here, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             env=dict(os.environ, PYTHONUNBUFFERED='1'))
            self.log_path, self.run_id, self.started = log.name, uuid.uuid4().hex[:12], time.time()
        return self.status()

    def stop(self):
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        return self.status()

    def remove_log(self):
        if self.log_path and os.path.exists(self.log_path):
            os.remove(self.log_path)

    def status(self):
        if self.proc is None:
            return {'run': None, 'running': False}
        return {'run': self.run_id, 'running': self.proc.poll() is None, 'returncode': self.proc.returncode,
                'command': ['python', *self.command[1:]], 'log_file': self.log_path, 'started': self.started}

    def read_log(self, offset, limit=1 << 16):
        """Log text from byte `offset` on. While the run goes on, only whole lines."""
        require(offset.isdigit(), "'offset' must be a non-negative integer", 'offset')
        offset, status = int(offset), self.status()
        if self.proc is None:
            return dict(status, text='', offset=0)
        with open(self.log_path, 'rb') as f:
            f.seek(offset)
            data = f.read(limit)
        if status['running'] and b'\n' in data:
            data = data[:data.rfind(b'\n') + 1]
        return dict(status, text=data.decode('utf-8', errors='replace'), offset=offset + len(data))
