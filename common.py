"""
Process setup every script repeats otherwise, in one place (nanochat's common.py): the device and
dtype policy, CPU threads, joining a torchrun job, the autocast context, seeds that survive a resume,
the learning-rate schedule, one out_dir per run, the progress bar, and the checks of the settings the
training scripts (train.py, rl.py) share, with the guard that stops a run going non-finite.
"""
import atexit
import contextlib
import fcntl
import functools
import glob
import math
import os
import shutil
import socket
import sys
import time
import zlib

import torch

from configurator import fail

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (Linux); an empty set where there is none."""
    try:
        with open('/proc/cpuinfo') as f:
            return set(next((line for line in f if line.startswith('flags')), '').split(':')[-1].split())
    except OSError:
        return set()


@functools.cache
def bfloat16_speedup():
    """How many times faster a 512-wide matmul runs in bfloat16 than in float32 on this CPU, with
    torch's threads as they are: a probe of about 0.1 s. Having the instructions is not enough: on
    one 2-core AVX-512 BF16 VM bfloat16 trained the quick start in 0.55x float32's time, on another
    host of the same VM in 1.5x."""
    def seconds(dtype):
        a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
        a @ b  # the first call sets up the kernel
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < 0.03:
            a @ b
            n += 1
        return (time.perf_counter() - t0) / n
    return seconds(torch.float32) / seconds(torch.bfloat16)


def auto_dtype(device, dtype):
    """`dtype`, or for 'auto' the fastest dtype that keeps float32's quality on `device`, with one
    printed line saying which and why: bfloat16 on GPUs that support it (float16 on older ones) and
    on CPUs that compute it natively (AVX-512 BF16 or AMX) where a probe finds it at least 1.2x as
    fast as float32 (bfloat16_speedup), float32 elsewhere. Training autocasts to
    it; inference casts the weights. Every script asks here."""
    if dtype != 'auto':
        return dtype
    if device.startswith('cuda') and torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        name, why = ('bfloat16', 'this GPU supports it') if bf16 else ('float16', 'this GPU has no bfloat16')
    elif device.startswith('cuda') or device == 'mps':
        name, why = 'float32', f"float32 on {device}"
    else:
        flags = cpu_flags()
        # where /proc/cpuinfo is missing (macOS, Windows) torch's own probe of the CPU answers
        native = [n for n, f, probe in [('AMX', 'amx_bf16', '_is_amx_tile_supported'),
                                        ('AVX-512 BF16', 'avx512_bf16', '_is_avx512_bf16_supported')]
                  if f in flags or (not flags and getattr(torch.cpu, probe, lambda: False)())]
        speedup = bfloat16_speedup() if native else None
        name = 'bfloat16' if native and speedup >= 1.2 else 'float32'
        if not native:
            why = "this CPU has no native bfloat16 (AVX-512 BF16 or AMX)"
        else:  # a CPU that has the instructions may still not run them faster (a VM's host, an old oneDNN)
            why = f"this CPU has {native[0]}, and its bfloat16 matmuls ran {speedup:.1f}x float32's speed here"
    # stderr: sample.py's stdout is the samples themselves
    print(f"dtype: {name} (auto: {why}; --dtype=float32 to override)", file=sys.stderr)
    return name


def compiled(model, device):
    """torch.compile(model), or the model itself with one line on stderr where no compiler works
    here (no Triton for a GPU, as on Windows; no C++ compiler for a CPU): that fails only at the
    first forward, deep in a traceback, so a tiny function is compiled first to find out."""
    try:
        torch.compile(lambda t: t * 2)(torch.ones(2, device=device))
    except Exception as e:
        print(f"torch.compile does not work here ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); "
              f"running without it", file=sys.stderr)
        return model
    return torch.compile(model)


def check_device_dtype(device, dtype):
    """The torch dtype named `dtype` ('auto' resolved by auto_dtype), after checking that `device`
    exists here; ValueError (with the fix) otherwise. Every script asks here."""
    if dtype not in DTYPES and dtype != 'auto':
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not '{dtype}'")
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError("CUDA is not available on this machine: use --device=cpu")
    if device == 'mps' and not torch.backends.mps.is_available():
        raise ValueError("MPS is not available on this machine: use --device=cpu")
    return DTYPES[auto_dtype(device, dtype)]


def resolve_dtype(device, dtype):
    """(name, torch dtype) of `dtype` on `device`, 'auto' resolved; one line and exit 1 where it cannot work."""
    try:
        name = auto_dtype(device, dtype)
        return name, check_device_dtype(device, name)
    except ValueError as e:
        fail(str(e))


def reset_peak_memory(device):
    """Start peak_memory's count here, so that loading (a transformers model converted, a checkpoint read) does not
    count as training: on Linux the process's peak resident size resets through /proc/self/clear_refs."""
    import gc
    gc.collect()
    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError, AttributeError):  # glibc keeps freed memory resident: hand it back first
        import ctypes
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    with contextlib.suppress(OSError):
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')


def peak_memory(device):
    """The most memory this run has held since reset_peak_memory, in words: the GPU's allocated tensors on CUDA,
    the process's resident size (the Python runtime and libraries included) elsewhere."""
    if device.startswith('cuda'):
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB of CUDA tensors"
    import resource
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB resident (the whole process)"


def set_threads(threads):
    """torch's CPU threads: `threads`, or for 0 one fewer than its default. A model on every core stalls whenever
    anything else runs, as each parallel op waits for its slowest thread: on a busy 2-core machine 2 threads
    sampled the quick-start model 1.3-28x slower than 1 (docs/experiments.md, Threads)."""
    if threads or torch.get_num_threads() > 1:
        torch.set_num_threads(threads or torch.get_num_threads() - 1)


def init_distributed(device, backend='auto'):
    """Join the torchrun job this process belongs to, if any: (ddp, rank, local_rank, world_size, device),
    the device becoming this rank's GPU. backend 'auto': NCCL on CUDA, gloo on CPUs."""
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 0, 1, device
    from torch.distributed import init_process_group
    rank, local_rank, world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    init_process_group(backend=('nccl' if device.startswith('cuda') else 'gloo') if backend == 'auto' else backend)
    return True, rank, local_rank, world, device


def autocast(device_type, dtype):
    """Mixed precision for training: autocast to dtype (a name), none for float32."""
    if dtype == 'float32':
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type=device_type, dtype=DTYPES[dtype])


def stable_seed(seed, *parts):
    """A seed for (seed, parts...) that is the same in every process and after a resume (Python's hash() of
    a str changes with every process; crc32 does not)."""
    return zlib.crc32(repr((seed,) + parts).encode())


def set_peak_lrs(optimizer, learning_rate, muon_lr):
    """Each optimizer group's peak rate, which the schedule scales (group['initial_lr']): this run's
    learning_rate, or muon_lr for Muon's matrices; set again over a resumed state, which brings the old run's."""
    for group in optimizer.param_groups:
        group['initial_lr'] = muon_lr if group.get('use_muon') else learning_rate


def lr_at(it, learning_rate, warmup_iters, decay_iters, min_lr, shape='cosine'):
    """The learning rate at iteration `it`: a linear warmup over warmup_iters, then down to min_lr at
    decay_iters along a cosine ('cosine', nanoGPT's) or a straight line ('linear'), min_lr after."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:  # also right after warmup when decay_iters <= warmup_iters
        return min_lr
    ratio = (it - warmup_iters) / (decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio)) if shape == 'cosine' else 1 - ratio  # runs 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


# -----------------------------------------------------------------------------
# the settings the training scripts share, checked alike wherever they appear

AT_LEAST_ONE = ('batch_size', 'block_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval', 'eval_iters',
                'n_layer', 'n_head', 'n_embd', 'questions_per_step', 'samples_per_question', 'max_new_tokens',
                'eval_samples')
AT_LEAST_ZERO = ('max_iters', 'warmup_iters', 'lr_decay_iters', 'n_kv_head', 'eval_questions', 'top_k')
FINITE_AT_LEAST_ZERO = ('learning_rate', 'min_lr', 'muon_lr', 'weight_decay', 'grad_clip', 'logit_softcap',
                        'temperature')
FRACTIONS = ('beta1', 'beta2', 'muon_momentum', 'dropout')  # >= 0 and < 1


def check_training_settings(settings):
    """The first problem with the shared training settings among `settings` (a script's globals), in one line
    and exit 1: every training script calls this, so a value one accepts no other refuses."""
    have = lambda names: [k for k in names if k in settings]  # noqa: E731
    problems = [f"{k} must be >= 1, not {settings[k]}" for k in have(AT_LEAST_ONE) if settings[k] < 1]
    problems += [f"{k} must be >= 0, not {settings[k]}" for k in have(AT_LEAST_ZERO) if settings[k] < 0]
    problems += [f"{k} must be a finite number >= 0, not {settings[k]}" for k in have(FINITE_AT_LEAST_ZERO)
                 if not (math.isfinite(settings[k]) and settings[k] >= 0)]
    problems += [f"{k} must be >= 0 and < 1, not {settings[k]}" for k in have(FRACTIONS) if not 0 <= settings[k] < 1]
    if settings.get('optimizer', 'adamw') not in ('adamw', 'muon'):
        problems.append(f"optimizer must be 'adamw' or 'muon', not '{settings['optimizer']}'")
    if problems:
        fail(problems[0])


def nonfinite(loss=None, model=None, probe=None):
    """What went non-finite, in words, or None: the loss (a float), a weight of the model, or (probe: token ids)
    the model's logits on them, which weights too large to compute with give even while each is finite."""
    if loss is not None and not math.isfinite(loss):
        return f"the loss is {loss}"
    for name, p in (model.named_parameters() if model is not None else ()):
        if not bool(torch.isfinite(p.detach()).all()):
            return f"the weight {name} is not finite"
    if probe is not None:
        with torch.no_grad():
            logits = model(torch.tensor([probe[-model.config.block_size:]], device=model.lm_head.weight.device))[0]
        if not bool(torch.isfinite(logits).all()):
            return "the model's logits are not finite"
    return None


# -----------------------------------------------------------------------------
# one run per out_dir, and the progress bar

HELD_LOCKS = set()  # the out_dir locks this process holds


def lock_out_dir(out_dir, script):
    """Create out_dir and hold out_dir/train.lock for the life of the run: one run per out_dir.
    An flock belongs to the open file, so the kernel drops it when the process ends, however it
    ends: the lock file a killed run leaves behind is stale by construction and the next run takes it.
    Also removes the temporary checkpoint a killed save left behind. A process that holds the lock
    already (a script run again in the same Python process, as the tests do) keeps it."""
    lock_path = os.path.join(out_dir, 'train.lock')
    if os.path.realpath(lock_path) in HELD_LOCKS:
        return
    try:
        os.makedirs(out_dir, exist_ok=True)
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors='replace').strip() or 'another process'
                fail(f"out_dir '{out_dir}' is in use by {holder}: wait for it to end or pick another out_dir")
            # the run before us removes the file as it exits: make sure we hold the one on disk now
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)

        def unlock():  # remove the file while still holding it, then let go
            with contextlib.suppress(OSError):
                os.remove(lock_path)
            os.close(fd)
        atexit.register(unlock)
        HELD_LOCKS.add(os.path.realpath(lock_path))
        os.ftruncate(fd, 0)
        os.write(fd, f"{script} pid {os.getpid()} on {socket.gethostname()}".encode())
        # a temporary checkpoint left by a killed run: no one else writes here while we hold the lock
        for path in glob.glob(os.path.join(out_dir, 'ckpt*.tmp')):  # ckpt.pt.<pid>.tmp, ckpt-shards.tmp
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            print(f"removed {path}, left by an interrupted save")
    except OSError as e:
        fail(f"cannot write to out_dir '{out_dir}': {e.strerror or e}")


class AboveTheBar:
    """stdout or stderr while the progress bar is drawn: each whole line is written above the bar, not through it."""

    def __init__(self, stream, bar):
        self.stream, self.bar, self.partial = stream, bar, ''

    def write(self, text):
        lines, newline, self.partial = (self.partial + text).rpartition('\n')
        if newline:
            self.bar.clear()
            self.stream.write(lines + newline)
            self.stream.flush()
            self.bar.refresh()
        return len(text)

    def __getattr__(self, name):  # flush, fileno, isatty, ...
        return getattr(self.stream, name)


def progress_bar(total, initial=0, desc='training'):
    """On a terminal, a tqdm bar (with the lines a script prints written above it, not through it); None
    elsewhere (a file, CI, serve.py's page, which parse a script's plain log lines). close_progress ends it."""
    if not sys.stdout.isatty():
        return None
    from tqdm import tqdm
    bar = tqdm(desc=desc, total=total, initial=initial, unit='it', file=sys.stdout, dynamic_ncols=True)
    sys.stdout, sys.stderr = AboveTheBar(sys.stdout, bar), AboveTheBar(sys.stderr, bar)
    return bar


def close_progress(bar):
    if bar is not None:  # the streams as they were, and the finished bar left on screen
        sys.stdout, sys.stderr = sys.stdout.stream, sys.stderr.stream
        bar.close()
