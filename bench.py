"""
Benchmarks, in two modes.

train (nanoGPT's bench.py): time the forward, backward and update of a training iteration on
real data (data/<dataset>/train.bin) or random tokens; prints ms/iter, tokens/s and MFU. With
profile=True it writes a torch.profiler trace into profile_dir instead, which TensorBoard opens
(pip install tensorboard torch-tb-profiler; tensorboard --logdir=bench_log).

$ python bench.py                                   # GPT-2 124M on a GPU
$ python bench.py --device=cpu --real_data=False --n_layer=4 --n_head=4 --n_embd=256 --block_size=256 --batch_size=4
$ python bench.py --profile=True

Under torchrun, train mode compares DDP, FSDP and FSDP + activation checkpointing on one model: time
per iteration and, per rank, the parameters + gradients + optimizer state it holds and the activations
its forward keeps for the backward (on a GPU also CUDA's peak allocated memory).
$ torchrun --standalone --nproc_per_node=2 bench.py --device=cpu --dtype=float32 --real_data=False \
    --block_size=256 --batch_size=1 --warmup_iters=1 --max_iters=1

sample: prefill and decode tokens/s of the decode engine (engine.py, what sample.py and serve.py
run), side by side with nanoGPT's uncached loop (written out below as the reference) and, with
compare_hf=True, transformers' generate on the same weights (GPT2LMHeadModel, or NanoChatForCausalLM
for nanochat's architecture: hf.py's mapping) and, with compare_llamacpp=True (llama-cpp-python
installed), llama.cpp on the same weights through export.py's GGUF files (f32, f16 and q8_0, batch 1;
ours in float32 and with int8 Linears join the table to pair with them).

$ python bench.py --mode=sample --compare_hf=True   # GPT-2 124M shapes, random weights
$ python bench.py --mode=sample --compare_hf=True --compare_llamacpp=True --compare_uncached=False --repeats=3
$ python bench.py --mode=sample --init_from=resume --out_dir=out-shakespeare-char
$ python bench.py --mode=sample --init_from=resume --out_dir=out-shakespeare-char --batch_sizes=[1] \
    --draft=ngram --prompt=FILE:prompt.txt --temperature=0   # speculative decoding against plain, same prompt
"""
import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn import functional as F

from checkpoint import saved_model_args, write_checkpoint
from common import auto_dtype, autocast, check_device_dtype, compiled, init_distributed
from configurator import configure, fail
from engine import Engine, Row
from inference import for_inference
from model import GPT, GPTConfig
from tokenizer import read_meta

# -----------------------------------------------------------------------------
mode = 'train'  # 'train' | 'sample'
# the model: GPT-2 124M shapes (sample mode ignores them when it loads a checkpoint)
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
bias = True
vocab_size = 0  # 0: 50304 to train (GPT-2's 50257 padded to a multiple of 64), 50257 to sample (transformers' GPT-2)
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # bfloat16 where the GPU or CPU computes it natively, else float32 (float16 on older GPUs); or name one
# train mode
batch_size = 12
real_data = True  # batches from data/<dataset>/train.bin; False: random tokens (no data needed)
dataset = 'openwebtext'
compile = torch.cuda.is_available()  # torch.compile the model; on a CPU it costs more than it saves
warmup_iters = 10  # untimed iterations first (compilation, allocator, kernel selection)
max_iters = 20  # timed iterations
peak_flops = 312e12  # for MFU: A100 bf16 = 312e12, H100 SXM bf16 ~= 989e12
profile = False  # write a torch.profiler trace instead of timing
profile_dir = './bench_log'
profile_wait = 5  # the profiler's schedule: iterations skipped, then traced but thrown away, then kept
profile_warmup = 5
profile_active = 5
# sample mode
init_from = 'scratch'  # 'scratch' (random weights), 'resume' (out_dir/ckpt.pt), a gpt2 name or a local transformers directory
out_dir = 'out'
batch_sizes = [1, 8]
prompt_tokens = 16
max_new_tokens = 128
temperature = 1.0
top_k = 200  # 0 = no limit
compare_hf = False  # also time transformers' generate (KV cache on) with the same weights
compare_llamacpp = False  # also time llama.cpp (llama-cpp-python) on GGUF exports of the same weights, batch 1
quantize = ''  # 'int8': our model with int8 Linears, as sample.py --quantize=int8
packed = True  # on a CPU our Linears' weights in oneDNN's packed layout, as sample.py and serve.py run; False: nn.Linear
compare_uncached = True  # also time nanoGPT's original loop: a full forward over the sequence per token
repeats = 1  # timed runs per implementation and batch size, taking turns; the fastest counts
prompt = ''  # '': prompt_tokens random ids; else this text ("FILE:path" reads a file), every row the same
draft = ''  # 'ngram' or a draft model's out_dir: ours with speculative decoding joins the table beside ours without
# (docs/speculative.md)
draft_tokens = 4
# -----------------------------------------------------------------------------
configure(globals())
# -----------------------------------------------------------------------------

if mode not in ('train', 'sample'):
    fail(f"mode must be 'train' or 'sample', not '{mode}'")
try:
    dtype = auto_dtype(device, dtype)
    ptdtype = check_device_dtype(device, dtype)
except ValueError as e:
    fail(str(e))
torch.manual_seed(seed)
device_type = 'cuda' if 'cuda' in device else 'cpu'
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True


def now():
    """A timestamp after the GPU has finished what was queued (CUDA runs asynchronously)."""
    if device_type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter()


# =============================================================================
# train mode
# =============================================================================

def bench_train():
    ctx = autocast(device_type, dtype)
    if real_data:
        data_dir = os.path.join('data', dataset)
        path = os.path.join(data_dir, 'train.bin')
        if not os.path.exists(path):
            fail(f"{path} not found: run 'python {os.path.join(data_dir, 'prepare.py')}' or pass --real_data=False")
        meta_path = os.path.join(data_dir, 'meta.pkl')
        meta = read_meta(meta_path) if os.path.exists(meta_path) else {}
        data = np.memmap(path, dtype=np.dtype(meta.get('dtype', 'uint16')), mode='r')
        if len(data) <= block_size:
            fail(f"{path} has {len(data)} tokens, too few for one block of {block_size}+1")

        def get_batch():
            ix = torch.randint(len(data) - block_size, (batch_size,)).numpy()
            window = torch.from_numpy(data[ix[:, None] + np.arange(block_size + 1)].astype(np.int64))
            return window[:, :-1].to(device), window[:, 1:].to(device)
    else:
        x = torch.randint(vocab_size or 50304, (batch_size, block_size), device=device)
        y = torch.randint(vocab_size or 50304, (batch_size, block_size), device=device)

        def get_batch():
            return x, y

    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                       vocab_size=vocab_size or 50304, dropout=0.0)
    model = GPT(config).to(device)
    optimizer = model.configure_optimizers(weight_decay=1e-2, learning_rate=1e-4, betas=(0.9, 0.95),
                                           device_type=device_type)
    raw_model = model
    if compile:
        print("Compiling model...")
        model = compiled(model, device)

    def train_step(X, Y):
        with ctx:
            _, loss = model(X, Y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()  # waits for the GPU: every timed iteration has finished

    if profile:
        # the schedule leaves out the first (slow) iterations; the kept ones go to profile_dir
        # as a Chrome trace that TensorBoard's profiler plugin (or chrome://tracing) opens
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device_type == 'cuda':
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        num_steps = profile_wait + profile_warmup + profile_active
        with torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=profile_wait, warmup=profile_warmup, active=profile_active, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(profile_dir),
            record_shapes=False,
            profile_memory=False,
            with_stack=False,  # True adds Python stacks to the trace, but makes it much larger
        ) as prof:
            for k in range(num_steps):
                lossf = train_step(*get_batch())
                print(f"{k}/{num_steps} loss: {lossf:.4f}")
                prof.step()  # tells the profiler's schedule that one iteration ended
        print(f"trace written to {profile_dir}: tensorboard --logdir={profile_dir}")
        return

    for stage, num_steps in enumerate([warmup_iters, max_iters]):  # warm up, then time
        t0 = now()
        for k in range(num_steps):
            lossf = train_step(*get_batch())
            print(f"{k}/{num_steps} loss: {lossf:.4f}")
        dt = now() - t0
        if stage == 1 and num_steps > 0:
            per_iter = dt / num_steps
            mfu = raw_model.estimate_mfu(batch_size, per_iter, peak_flops)
            print(f"time per iteration: {per_iter * 1000:.4f}ms, {batch_size * block_size / per_iter:,.0f} tok/s, "
                  f"MFU: {mfu * 100:.2f}%")


def held_bytes(model, optimizer):
    """Bytes of the parameters, gradients and optimizer state this rank holds: under FSDP, its shards."""
    from torch.distributed.tensor import DTensor  # here: ~0.5 s to import, and only torchrun's mode needs it
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


class SavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes autograd keeps for the backward while it is active: every tensor a forward
    saves, once per storage, leaving out the parameters (FSDP's gathered ones included). Activation
    checkpointing keeps only each block's input, which its checkpoint saves through the same hooks."""

    def __init__(self, model):
        from torch.distributed.tensor import DTensor
        self.bytes, self.seen = 0, set()

        def pack(t):
            storage = t.untyped_storage()
            params = {p.untyped_storage().data_ptr() for p in model.parameters() if not isinstance(p, DTensor)}
            if storage.data_ptr() not in self.seen and storage.data_ptr() not in params:
                self.seen.add(storage.data_ptr())
                self.bytes += storage.nbytes()
            return t
        super().__init__(pack, lambda t: t)


def bench_parallel():
    """DDP, FSDP and FSDP + activation checkpointing on the same model and batch, one after the other."""
    global device
    _, rank, _, world, device = init_distributed(device)
    ctx = autocast(device_type, dtype)
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                       vocab_size=vocab_size or 50304, dropout=0.0)
    g = torch.Generator().manual_seed(seed + rank)
    x, y = (torch.randint(config.vocab_size, (batch_size, block_size), generator=g).to(device) for _ in range(2))
    results, block_act = [], 0
    for name, fsdp, checkpointing in (('DDP', False, False), ('FSDP', True, False), ('FSDP + act. ckpt', True, True)):
        torch.manual_seed(seed)
        model = GPT(config).to(device)
        for block in model.transformer.h:
            block.activation_checkpointing = checkpointing
        if fsdp:
            model.shard(ptdtype if device_type == 'cuda' and dtype != 'float32' else None)
        with open(os.devnull, 'w') as quiet, contextlib.redirect_stdout(quiet):  # its parameter counts, once per setup
            optimizer = model.configure_optimizers(1e-2, 1e-4, (0.9, 0.95), device_type)
        wrapped = model if fsdp else DDP(model, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None)
        if device_type == 'cuda':
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for k in range(warmup_iters + max_iters):
            if k == warmup_iters:
                t0 = now()
            saved = SavedActivations(model)
            # the first block's own saves, to size the one block a checkpointed backward recomputes at a time
            hooks = [model.transformer.h[0].register_forward_pre_hook(lambda *_: setattr(saved, 'before', saved.bytes)),
                     model.transformer.h[0].register_forward_hook(lambda *_: setattr(saved, 'after', saved.bytes))]
            with saved, ctx:
                _, loss = wrapped(x, y)
            for h in hooks:
                h.remove()
            loss.backward()
            optimizer.step()
            states = held_bytes(model, optimizer)  # gradients still here
            optimizer.zero_grad(set_to_none=True)
            loss.item()
        per_iter = (now() - t0) / max(max_iters, 1)
        if not checkpointing:
            block_act = saved.after - saved.before
        # a checkpointed backward holds one recomputed block's activations on top of what the forward kept
        act = saved.bytes + (block_act if checkpointing else 0)
        peak = torch.cuda.max_memory_allocated() if device_type == 'cuda' else 0
        mine = (states, act, peak, world * batch_size * block_size / per_iter, per_iter)
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        results.append((name, everyone))
        del model, wrapped, optimizer, loss
    if rank == 0:
        print(f"{config.n_layer} layers, n_embd {config.n_embd}, vocab {config.vocab_size}: "
              f"{GPT(config).get_num_params(non_embedding=False) / 1e6:.1f}M parameters; {world} ranks, "
              f"batch {batch_size} x {block_size} tokens per rank, {dtype} on {device_type}")
        print(f"{'setup':<18}{'rank':>5}{'params+grads+optim':>20}{'activations':>13}"
              f"{'cuda peak':>11}{'tok/s':>10}{'ms/iter':>9}")
        for name, everyone in results:
            for r, (states, act, peak, tps, per_iter) in enumerate(everyone):
                print(f"{name:<18}{r:>5}{states / 2**20:>17.1f}MiB{act / 2**20:>10.1f}MiB"
                      f"{(f'{peak / 2**20:.0f}MiB' if peak else '-'):>11}{tps:>10,.0f}{per_iter * 1000:>9.0f}")
        base = results[0][1][0]
        fsdp_r, ac_r = results[1][1][0], results[2][1][0]
        print(f"rank 0: FSDP holds {fsdp_r[0] / base[0]:.2f}x DDP's parameter+gradient+optimizer bytes; activation "
              f"checkpointing keeps {fsdp_r[1] / ac_r[1]:.1f}x less activation memory than FSDP alone")
    dist.destroy_process_group()


# =============================================================================
# sample mode
# =============================================================================

@torch.inference_mode()
def uncached_generate(model, idx, max_new_tokens, temperature, top_k, generator):
    """THE REFERENCE, not used for sampling anywhere else: nanoGPT's original generate loop,
    without a KV cache. Every new token runs the full forward over the sequence so far (cropped
    to block_size), so a step costs O(length) matmul rows instead of one. Yields (B,) tokens."""
    for _ in range(max_new_tokens):
        idx_cond = idx if idx.size(1) <= model.config.block_size else idx[:, -model.config.block_size:]
        logits, _ = model(idx_cond)
        logits = logits[:, -1, :] / temperature
        if top_k:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float('Inf')
        probs = F.softmax(logits, dim=-1)
        idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
        idx = torch.cat((idx, idx_next), dim=1)
        yield idx_next[:, 0]


def hf_twin(model):
    """transformers' model with exactly our model's weights (hf.py's mapping: GPT2LMHeadModel,
    NanoChatForCausalLM or LlamaForCausalLM)."""
    from transformers import AutoModelForCausalLM
    cfg = model.config
    if init_from.startswith('gpt2') or os.path.isdir(init_from):
        hf = AutoModelForCausalLM.from_pretrained(init_from)  # both models load the same files
    else:
        from hf import to_hf
        try:
            hf_config, sd = to_hf(model, eot=min(50256, cfg.vocab_size - 1))
        except ValueError as e:
            fail(f"compare_hf: {e}")
        hf = AutoModelForCausalLM.from_config(hf_config)
        hf.load_state_dict(sd)
    hf.generation_config.pad_token_id = hf.config.eos_token_id  # else it warns on every call
    hf = hf.eval().to(device=device, dtype=ptdtype)
    # a timing of the same function only if it is the same function: compare the logits once
    with torch.inference_mode():
        idx = torch.randint(cfg.vocab_size, (2, min(8, cfg.block_size)), device=device)
        ours, theirs = model(idx)[0][:, -1].float(), hf(idx).logits[:, -1].float()
        err = ((ours - theirs).abs().max() / ours.abs().max()).item()
    if err > (1e-4 if ptdtype == torch.float32 else 5e-2):
        fail(f"transformers' twin disagrees with our model: relative logit difference {err:.1e}")
    print(f"transformers' twin: same logits as ours (relative difference {err:.1e})")
    return hf


DRAFTED = [0, 0]  # draft tokens proposed and accepted in the timed runs


def run_ours(model, prompts, n_new, generator, draft='', draft_model=None):
    """Times of: the call, and each new token's arrival, for the engine (made inside the timing,
    as sample.py makes it for every batch). A speculative step brings several: the k-th token has
    arrived when every row has k."""
    t0 = now()
    engine = Engine(model, len(prompts), n_new, longest_prompt=prompts.size(1), draft_model=draft_model)
    rows = [Row(p, n_new, temperature=temperature, top_k=top_k, seed=generator.initial_seed() + i, draft=draft,
                draft_tokens=draft_tokens) for i, p in enumerate(prompts.tolist())]
    engine.add(rows)
    times = []
    while engine.rows:
        engine.step()
        t = now()
        times += [t] * (min(len(row.tokens) for row in rows) - len(times))
        if n_new > 4:  # not the warm-up's
            DRAFTED[0] += sum(row.drafted[0] for row in rows)
            DRAFTED[1] += sum(row.drafted[1] for row in rows)
    return t0, times


def draft_impl(name, model, tokenizer):
    """Ours with the draft setting: prompt lookup, or a draft model (textgen.load_draft) that proposes."""
    draft_model = None
    if draft != 'ngram':
        from textgen import load_draft
        try:
            draft_model = load_draft(draft, tokenizer, device, dtype)
        except (FileNotFoundError, ValueError, OSError) as e:
            fail(f"draft: {e}")

    def run(model, prompts, n_new, generator):
        return run_ours(model, prompts, n_new, generator, 'ngram' if draft_model is None else 'model', draft_model)
    return [(f"{name} draft={'ngram' if draft_model is None else 'model'}", run, model)]


def run_uncached(model, prompts, n_new, generator):
    t0 = now()
    times = []
    for _ in uncached_generate(model, prompts, n_new, temperature, top_k, generator):
        times.append(now())
    return t0, times


def run_hf(hf, prompts, n_new, generator):
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        # generate() hands a streamer the prompt first, then each step's new tokens
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(now())

        def end(self):
            pass

    clock = Clock()
    torch.manual_seed(generator.initial_seed())  # transformers samples from the global generator
    t0 = now()
    hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=temperature,
                top_k=top_k, top_p=1.0, max_new_tokens=n_new, min_new_tokens=n_new, streamer=clock)
    return t0, clock.times[1:]


def llamacpp_twins(model, tmpdir):
    """(name, llama.cpp Llama) for GGUF exports of our weights (export.py, run as a user runs it, on a checkpoint
    of them) in f32, f16 and q8_0."""
    try:
        from llama_cpp import Llama
    except ImportError:
        fail("compare_llamacpp: llama-cpp-python is not installed (pip install llama-cpp-python)")
    from tokenizer import meta_path_for
    source = os.path.join(tmpdir, 'model')
    os.makedirs(source)
    args = {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}
    write_checkpoint(os.path.join(source, 'ckpt.pt'), {
        'model': {k: v.float() for k, v in model.state_dict().items()}, 'model_args': saved_model_args(args),
        'gelu_approximate': model.config.gelu_approximate, 'iter_num': 0, 'config': {}})
    meta = meta_path_for(out_dir) if init_from == 'resume' else None  # None: GPT-2's tokenizer
    if meta:
        shutil.copyfile(meta, os.path.join(source, 'meta.pkl'))
    twins = []
    for kind, export_dtype in [('f32', 'float32'), ('f16', 'float16'), ('q8_0', 'q8_0')]:
        path = os.path.join(tmpdir, f'model-{kind}.gguf')
        exported = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'export.py'),
                                   f'--out_dir={source}', '--format=gguf', f'--dtype={export_dtype}', f'--to={path}',
                                   '--check=False'], capture_output=True, text=True)
        if exported.returncode:  # export.py's own one-line error
            fail(f"compare_llamacpp: {(exported.stderr.strip().splitlines() or ['export.py failed'])[-1]}")
        llm = Llama(model_path=path, n_ctx=prompt_tokens + max_new_tokens + 8, n_threads=torch.get_num_threads(),
                    n_threads_batch=torch.get_num_threads(), seed=seed, verbose=False)
        twins.append((f"llama.cpp {kind}", run_llamacpp, llm))
    return twins


def twin(model, ptdtype, quantize=''):
    """A copy of our model (from its float weights) in ptdtype, made ready to generate as textgen.load_model makes them."""
    copy = GPT(model.config)
    copy.load_state_dict(model.state_dict())
    return for_inference(copy, device, ptdtype, quantize, packed)


def run_llamacpp(llm, prompts, n_new, generator):
    """llama-cpp-python's generate (batch 1), timed like ours: each token's arrival after the call."""
    llm.reset()  # else generate reuses the cached prompt and skips the prefill
    t0 = now()
    times = []
    for _ in llm.generate(prompts[0].tolist(), top_k=top_k, top_p=1.0, min_p=0.0, temp=temperature,
                          repeat_penalty=1.0):
        times.append(now())
        if len(times) == n_new:
            break
    return t0, times


def prompt_ids(tokenizer):
    """The ids of the prompt setting (its text, or a file's with FILE:path); GPT-2's tokenizer for random weights."""
    if tokenizer is None:
        from tokenizer import gpt2_tokenizer
        tokenizer = gpt2_tokenizer()
    text = prompt
    try:
        if text.startswith('FILE:'):
            with open(text[5:], encoding='utf-8') as f:
                text = f.read()
        return tokenizer.encode(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        fail(f"prompt: {e}")


def report_draft(rows, plain, drafted):
    print(f"draft={draft}: {DRAFTED[1]:,} of {DRAFTED[0]:,} proposed tokens accepted "
          f"({DRAFTED[1] / max(DRAFTED[0], 1):.0%}) in the timed runs")
    speed = {(name, B): d for name, B, _, d in rows}
    for B in batch_sizes:
        print(f"{drafted} / {plain}, batch {B}: {speed[drafted, B] / speed[plain, B]:.2f}x decode")


def check_sample_settings():
    if temperature < 0 or top_k < 0 or prompt_tokens < 1 or max_new_tokens < 2 or not batch_sizes:
        fail("sample mode needs temperature >= 0, top_k >= 0, prompt_tokens >= 1, max_new_tokens >= 2, batch_sizes")
    if temperature == 0 and (compare_hf or compare_llamacpp or compare_uncached):
        fail("temperature 0 (greedy) times ours only: set compare_uncached=False (and no compare_hf, compare_llamacpp)")
    if not 1 <= draft_tokens <= 64 or draft not in ('', 'ngram') and init_from == 'scratch':
        fail(f"draft_tokens must be 1 to 64 (not {draft_tokens}); a draft model needs a model with a tokenizer "
             f"(init_from='resume' or a name), not random weights")


def bench_sample():
    global prompt_tokens
    check_sample_settings()
    # `source`: the model's weights in ptdtype in plain Linears, which every implementation is made from
    if init_from == 'scratch':
        config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                           vocab_size=vocab_size or 50257, gelu_approximate='tanh', dropout=0.0)
        source = GPT(config).eval().to(device=device, dtype=ptdtype)
    else:
        from textgen import load_model
        try:
            source, tokenizer, _ = load_model(init_from, out_dir, device, dtype, pack=False)
        except (FileNotFoundError, ValueError, OSError) as e:
            fail(str(e))
    ids = prompt_ids(tokenizer if init_from != 'scratch' else None) if prompt else None
    prompt_tokens = len(ids) if ids else prompt_tokens
    cfg = source.config
    try:
        model = twin(source, ptdtype, quantize)
    except ValueError as e:  # a quantize it does not know
        fail(str(e))
    impls = [(f"ours {dtype}{' int8' if quantize else ''}", run_ours, model)]
    impls += draft_impl(impls[0][0], model, tokenizer if init_from != 'scratch' else None) if draft else []
    if compare_llamacpp:  # ours as llama.cpp's f32 and q8_0 run, for the pairs below the table
        if quantize:
            fail("compare_llamacpp times ours with and without int8 itself: leave quantize unset")
        if dtype != 'float32':
            impls.append(('ours float32', run_ours, twin(source, torch.float32)))
        impls.append((f"ours {dtype} int8", run_ours, twin(source, ptdtype, 'int8')))
    if compare_hf:
        if prompt_tokens + max_new_tokens > cfg.block_size:
            fail(f"compare_hf: prompt_tokens + max_new_tokens must fit in block_size ({cfg.block_size}); "
                 f"transformers' GPT-2 cannot go past it")
        hf = hf_twin(source)
        impls.append((f"transformers {dtype} ({hf.config._attn_implementation})", run_hf, hf))
    if compare_llamacpp:
        tmpdir = tempfile.mkdtemp(prefix='bench-gguf-')
        atexit.register(shutil.rmtree, tmpdir, True)
        impls.extend(llamacpp_twins(source, tmpdir))
    if compare_uncached:
        impls.append(("uncached (reference)", run_uncached, source))
    print(f"model: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, vocab {cfg.vocab_size}, "
          f"{source.get_num_params() / 1e6:.1f}M parameters; {device} {dtype}, {torch.get_num_threads()} threads")
    print(f"prompt {prompt_tokens} tokens, {max_new_tokens} new tokens, temperature {temperature}, top_k {top_k}")

    # the same random prompts for every implementation: row i of batch B is row i of the largest batch
    g = torch.Generator().manual_seed(seed)
    all_prompts = torch.randint(cfg.vocab_size, (max(batch_sizes), prompt_tokens), generator=g).to(device)
    if ids:
        all_prompts = torch.tensor([ids] * max(batch_sizes), device=device)
    rows = []
    with torch.inference_mode():
        for B in batch_sizes:
            prompts = all_prompts[:B]
            # llama-cpp-python's generate decodes one sequence: its rows are batch 1 only
            impls_b = [i for i in impls if B == 1 or i[1] is not run_llamacpp]
            for name, run, m in impls_b:
                run(m, prompts, 4, torch.Generator(device=device).manual_seed(seed))  # warm-up
            best = {name: (float('inf'), float('inf')) for name, _, _ in impls_b}
            for _ in range(repeats):
                for name, run, m in impls_b:  # take turns, so a busy spell on the machine hits all of them
                    t0, times = run(m, prompts, max_new_tokens, torch.Generator(device=device).manual_seed(seed))
                    assert len(times) == max_new_tokens
                    # prefill: the prompt pass and the first token; decode: the max_new_tokens-1 steps after it
                    prefill, decode = times[0] - t0, times[-1] - times[0]
                    best[name] = (min(best[name][0], prefill), min(best[name][1], decode))
            for name, _, _ in impls_b:
                prefill_tps = B * prompt_tokens / best[name][0]
                decode_tps = B * (max_new_tokens - 1) / best[name][1]
                rows.append((name, B, prefill_tps, decode_tps))
                print(f"  {name}, batch {B}: prefill {prefill_tps:,.1f} tok/s, decode {decode_tps:,.1f} tok/s", flush=True)

    print()
    print(f"{'impl':<28} {'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'ours/this':>10}")
    ours = {B: d for name, B, _, d in rows if name == impls[0][0]}
    for name, B, p, d in rows:
        print(f"{name:<28} {B:>5} {p:>14,.1f} {d:>13,.1f} {ours[B] / d:>9.2f}x")
    print("ours/this: our decode tok/s over this row's (above 1: ours is faster); decode tok/s = batch * "
          "(new tokens - 1) / time from the first new token to the last")
    if draft:
        report_draft(rows, impls[0][0], impls[1][0])
    decode = {(name, B): d for name, B, _, d in rows}
    pairs = [('ours float32', 'llama.cpp f32', None), (f'ours {dtype}', 'llama.cpp f16', 0.8),
             (f'ours {dtype} int8', 'llama.cpp q8_0', 0.8)]
    pairs += [(f'ours {dtype}', name, 1.3) for name, _, _ in impls if name.startswith('transformers')]
    for a, b, target in pairs:
        for B in batch_sizes:
            if (a, B) in decode and (b, B) in decode:
                print(f"{a} / {b}, batch {B}: {decode[a, B] / decode[b, B]:.2f}x"
                      + (f" (target >= {target}x)" if target else ''))


if mode == 'train' and 'RANK' in os.environ:
    bench_parallel()
elif mode == 'train':
    bench_train()
else:
    bench_sample()
