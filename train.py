"""
Train a GPT. Runs on one CPU or GPU, or on many with distributed data parallel (DDP), or with
fully sharded data parallel (FSDP: --fsdp=True) for models whose weights, gradients and optimizer
state do not fit on one GPU.

One process:
$ python train.py config/train_shakespeare_char_cpu.py --max_iters=500

DDP on 4 GPUs of one node:
$ torchrun --standalone --nproc_per_node=4 train.py config/train_gpt2.py

DDP on 2 nodes of 8 GPUs each (master at 123.456.123.456):
$ torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=123.456.123.456 --master_port=1234 train.py
$ torchrun --nproc_per_node=8 --nnodes=2 --node_rank=1 --master_addr=123.456.123.456 --master_port=1234 train.py
(without Infiniband, prepend NCCL_IB_DISABLE=1)

FSDP: the same commands with --fsdp=True (add --activation_checkpointing=True to trade compute for
activation memory); across nodes, out_dir must be on a filesystem every node sees.
"""
import atexit
import math
import os
import shutil
import signal
import sys
import time

import numpy as np
import torch
from torch.distributed import destroy_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import (SaveError, load_checkpoint, load_optimizer_state, load_pretrained, peft_base, remove_old_shards,
                        save_checkpoint, save_shards, saved_model_args)
from common import (autocast, check_training_settings, close_progress, compiled, init_distributed, lock_out_dir, lr_at,
                    nonfinite, peak_memory, progress_bar, reset_peak_memory, resolve_dtype, set_peak_lrs, stable_seed)
from configurator import configure, fail
from lora import TARGETS as LORA_TARGETS, LoRALinear, add_lora, has_lora, lora_state, trainable
from model import GPT, GPTConfig
from tasks.bpb import tokens_per_byte as targets_per_byte, windowed_loss
from tokenizer import (check_vocab, gpt2_tokenizer, load_tokenizer, pretrained_dir, read_meta, same_tokenizer,
                       tokenizer_from_meta)

# -----------------------------------------------------------------------------
# default settings: GPT-2 (124M) on OpenWebText
# I/O
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # evaluate once, then exit
eval_full_val = False  # at the end, also report the loss over the whole val split (non-overlapping windows)
always_save_checkpoint = True  # False: save only when val loss improves
init_from = 'scratch'  # 'scratch' | 'resume' | 'gpt2*' | a local transformers directory (e.g. from export.py) or hub id
#   | a base model's out_dir (holding ckpt.pt): fine-tune its weights in a new run written to out_dir
# wandb logging
wandb_log = False
wandb_project = 'owt'
wandb_run_name = 'gpt2'
# data
dataset = 'openwebtext'
gradient_accumulation_steps = 5 * 8  # micro-steps per optimizer step, split across DDP ranks
batch_size = 12  # micro-batch size
block_size = 1024
seed = 1337
chat_loss = 'replies'  # a chat dataset's loss: on the assistant's tokens ('replies', SFT) or on every token ('all':
#   midtraining, which also learns the chat and tool tokens and the questions' text, as nanochat's midtraining does)
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # 0 for pretraining, try 0.1+ for finetuning
bias = False  # bias inside LayerNorm and Linear layers?
# architecture switches beyond GPT-2 (see model.py's GPTConfig and the README)
n_kv_head = 0  # 0: as many key/value heads as query heads
use_rope = False
rope_theta = 10000.0
use_alibi = False
norm = 'layernorm'
qk_norm = False
mlp = 'gelu'  # 'gelu' | 'relu2' | 'swiglu' (with use_rope, norm='rmsnorm', bias=False: the Llama architecture)
intermediate_size = 0  # swiglu's hidden width (0: LLaMA's 8/3 * n_embd, rounded up to a multiple of 256)
rms_norm_eps = 1e-6  # the epsilon of norm='rmsnorm'
logit_softcap = 0.0
tie_embeddings = True
embed_norm = False  # RMS-normalise the token embedding (with use_rope, norm='rmsnorm', qk_norm: nanochat's model)
# LoRA (lora.py): freeze the base model (init_from) and train low-rank adapters on its Linears; the checkpoint
# holds the adapters and names the base, and every script that loads out_dir merges them in
lora_rank = 0  # 0: off, full fine-tuning
lora_alpha = 16.0  # the update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = 'all'  # 'attn' | 'mlp' | 'all': which Linears of every block get adapters
# optimizer
optimizer = 'adamw'  # 'adamw' | 'muon'
learning_rate = 6e-4  # max learning rate (AdamW's; with muon, the embeddings' and head's)
muon_lr = 0.02  # max learning rate of the Muon group (the matrices inside the blocks)
muon_momentum = 0.95
max_iters = 600000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 disables
# learning rate schedule: linear warmup, cosine decay to min_lr
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000  # ~= max_iters per Chinchilla
min_lr = 6e-5  # ~= learning_rate/10 per Chinchilla
# DDP / FSDP
backend = 'auto'  # 'nccl' | 'gloo' | 'auto' (nccl on CUDA, gloo on CPU)
fsdp = False  # under torchrun: shard weights, gradients and optimizer state across the ranks instead of copying them
activation_checkpointing = False  # recompute each block's activations in the backward: less memory, ~1/3 more compute
# system
device = 'cuda'  # 'cpu', 'cuda', 'cuda:0', 'mps'
dtype = 'auto'  # bfloat16 where the GPU or CPU computes it natively, float16 on older GPUs, else float32; or name one
compile = True  # torch.compile the model (PyTorch 2); with no working compiler here: one line, then without
peak_flops = 0.0  # for MFU: A100 bf16 = 312e12, H100 SXM bf16 ~= 989e12; 0: an A100 on a GPU, no MFU on a CPU
# -----------------------------------------------------------------------------
# on resume the architecture comes from the checkpoint; these defaults tell which of them this run set
architecture_defaults = {k: globals()[k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'dropout',
                                                   'n_kv_head', 'use_rope', 'rope_theta', 'use_alibi', 'norm',
                                                   'qk_norm', 'mlp', 'intermediate_size', 'rms_norm_eps',
                                                   'logit_softcap', 'tie_embeddings', 'embed_norm')}
configure(globals())
config = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
# -----------------------------------------------------------------------------

# settings that cannot work stop here, before any work, with one line (the checks every training script shares)
check_training_settings(globals())
if chat_loss not in ('replies', 'all'):
    fail(f"chat_loss must be 'replies' or 'all', not {chat_loss!r}")
dtype, ptdtype = resolve_dtype(device, dtype)

# various inits, derived attributes, I/O setup
ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = init_distributed(device, backend)
master_process = ddp_rank == 0  # this process logs and writes checkpoints
seed_offset = ddp_rank  # each process draws its own dropout masks
if ddp:
    # the global batch stays the same whatever the number of processes
    if gradient_accumulation_steps % ddp_world_size != 0:
        fail(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be divisible by the "
             f"number of processes ({ddp_world_size})")
    gradient_accumulation_steps //= ddp_world_size
elif fsdp:
    fail("fsdp=True shards across the processes torchrun starts: torchrun --nproc_per_node=N train.py ...")
LORA_FSDP = "lora_rank with fsdp=True is not supported: the frozen base needs no sharded optimizer state, use DDP"
if lora_rank:
    if lora_targets not in LORA_TARGETS:
        fail(f"lora_targets must be one of {', '.join(LORA_TARGETS)}, not '{lora_targets}'")
    if lora_alpha <= 0:
        fail(f"lora_alpha must be > 0, not {lora_alpha}")
    if init_from == 'scratch':
        fail("lora_rank trains adapters over a base model: set init_from (a model's out_dir, a transformers or PEFT "
             "directory, a gpt2 name)")
    if fsdp:
        fail(LORA_FSDP)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')


# rank 0 speaks for the run: it takes the lock and writes the checkpoints
if master_process:
    lock_out_dir(out_dir, 'train.py')
torch.manual_seed(seed)  # the same initial weights on every rank: FSDP shards them as they are
torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
device_type = 'cuda' if 'cuda' in device else 'cpu'  # for autocast
if device_type == 'cpu' and dtype == 'float16':
    ptdtype, dtype = torch.float32, 'float32'  # float16 autocast is a GPU thing; float32 on CPU
ctx = autocast(device_type, dtype)

# data: token files written by data/<dataset>/prepare.py, read through np.memmap
data_dir = os.path.join('data', dataset)
meta_path = os.path.join(data_dir, 'meta.pkl')
try:
    meta = read_meta(meta_path) if os.path.exists(meta_path) else {}
except ValueError as e:
    fail(str(e))


def dataset_tokenizer():
    return tokenizer_from_meta(meta) if meta else gpt2_tokenizer()  # no meta.pkl: GPT-2's BPE


data_dtype = np.dtype(meta.get('dtype', 'uint16'))
for split in ('train', 'val'):
    path = os.path.join(data_dir, f'{split}.bin')
    if not os.path.exists(path):
        fail(f"{path} not found: run 'python {os.path.join(data_dir, 'prepare.py')}' first")
# a chat dataset (data/chat/prepare.py) has masks: the loss counts only the assistant's tokens
masked = os.path.exists(os.path.join(data_dir, 'train_mask.bin'))
for split in ('train', 'val') if masked else ():
    path = os.path.join(data_dir, f'{split}_mask.bin')
    if not os.path.exists(path) or os.path.getsize(path) != os.path.getsize(os.path.join(data_dir, f'{split}.bin')) // data_dtype.itemsize:
        fail(f"{path} is missing or does not match {split}.bin: prepare the dataset again")
starts = {}  # split -> the offsets a window may start at, for a chat dataset (set below, once block_size is known)


def get_batch(split, generator):
    # recreate the memmap every batch: a long-lived one keeps growing in memory
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=data_dtype, mode='r')
    if split in starts:  # every window starts at a conversation's <|bos|>: no reply without its question
        ix = starts[split][torch.randint(len(starts[split]), (batch_size,), generator=generator).numpy()]
    else:
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
    window = check_ids(data[ix[:, None] + np.arange(block_size + 1)].astype(np.int64), split)
    x, y = torch.from_numpy(window[:, :-1].copy()), masked_targets(split, ix, window[:, 1:])
    if device_type == 'cuda':
        # pin x,y so they move to the GPU asynchronously (non_blocking=True)
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def check_ids(window, split):
    # an id past the model's vocabulary would index past its embedding: a traceback on a CPU, a device assert on a GPU
    if window.max() >= model_args['vocab_size']:
        fail(f"{os.path.join(data_dir, split + '.bin')} holds token id {window.max()}, past the model's vocabulary of "
             f"{model_args['vocab_size']}: was it prepared with another tokenizer? Prepare the dataset again")
    return window


def masked_targets(split, ix, y):
    """The targets of windows starting at ix; with masks, -1 (ignored by the loss) where the
    target is not the assistant's."""
    if masked and chat_loss == 'replies':
        mask = np.memmap(os.path.join(data_dir, f'{split}_mask.bin'), dtype=np.uint8, mode='r')
        y = np.where(mask[ix[:, None] + np.arange(1, y.shape[1] + 1)] == 1, y, -1)
    return torch.from_numpy(np.ascontiguousarray(y))


def batch_generator(*parts):
    """Batches are a pure function of (seed, split, iteration, micro-step): a resumed run draws
    exactly the batches the uninterrupted run would, with no sampler state to save."""
    g = torch.Generator()
    g.manual_seed(stable_seed(seed, 'batch', *parts))
    return g


# vocabulary size: from the dataset's meta.pkl if it has one
meta_vocab_size = None
if meta.get('tokenizer') == 'gpt2':
    meta_vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64 for faster matmuls
elif 'vocab_size' in meta:
    meta_vocab_size = meta['vocab_size']
    if master_process:
        print(f"found vocab_size = {meta_vocab_size} (inside {meta_path})")

# model init
iter_num = 0
best_val_loss = 1e9
saved_iter = None  # the iteration out_dir/ckpt.pt holds, once this run has loaded or saved one
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                  vocab_size=None, dropout=dropout, n_kv_head=n_kv_head, use_rope=use_rope, rope_theta=rope_theta,
                  use_alibi=use_alibi, norm=norm, qk_norm=qk_norm, mlp=mlp, intermediate_size=intermediate_size,
                  rms_norm_eps=rms_norm_eps, logit_softcap=logit_softcap, tie_embeddings=tie_embeddings,
                  embed_norm=embed_norm)
checkpoint = None
if init_from == 'scratch':
    if master_process:
        print("Initializing a new model from scratch")
    if meta_vocab_size is None and master_process:
        print("defaulting to vocab_size of GPT-2 to 50304 (50257 rounded up for efficiency)")
    model_args['vocab_size'] = meta_vocab_size if meta_vocab_size is not None else 50304
    try:
        model = GPT(GPTConfig(**model_args))
    except AssertionError as e:
        fail(f"invalid model settings: {e}")
elif init_from == 'resume':
    if not os.path.exists(ckpt_path):
        fail(f"init_from='resume' but there is no checkpoint at {ckpt_path}")
    if master_process:
        print(f"Resuming training from {out_dir}")
    # the architecture comes from the checkpoint; the rest of the settings from this run
    try:  # dropout is a training setting: this run's, if it sets one
        model, checkpoint = load_checkpoint(out_dir, device, merge=False,
                                            dropout=None if dropout == architecture_defaults['dropout'] else dropout)
    except ValueError as e:
        fail(str(e))
    lora_base = (checkpoint.get('lora') or {}).get('base')
    if lora_rank and (lora_base is None or lora_rank != checkpoint['lora']['rank']):
        fail(f"{ckpt_path} was trained with lora_rank={(checkpoint.get('lora') or {}).get('rank', 0)}: drop lora_rank "
             f"to resume it, or train in a new out_dir")
    lora = checkpoint.get('lora') or {}
    lora_rank, lora_alpha, lora_targets = lora.get('rank', 0), lora.get('alpha', lora_alpha), lora.get('targets', lora_targets)
    # an architecture setting this run changed from its default must agree with the checkpoint;
    # block_size may shrink (below)
    saved = model.config
    conflicts = [f"{k}={globals()[k]!r} (checkpoint: {getattr(saved, k)!r})"
                 for k, default in architecture_defaults.items() if k not in ('dropout', 'block_size')
                 and globals()[k] != default and globals()[k] != getattr(saved, k)]
    if conflicts:
        fail(f"{ckpt_path} was trained with another architecture: {', '.join(conflicts)}; "
             f"drop these settings to resume it, or train in a new out_dir")
    if block_size == architecture_defaults['block_size']:
        block_size = saved.block_size
    iter_num = saved_iter = checkpoint['iter_num']
    best_val_loss = checkpoint['best_val_loss']
elif os.path.isfile(os.path.join(init_from, 'ckpt.pt')):
    if os.path.abspath(init_from) == os.path.abspath(out_dir):
        fail("init_from is this run's out_dir: use init_from='resume' to continue it, or pick another out_dir")
    if master_process:
        print(f"Fine-tuning {init_from}/ckpt.pt: a new run from its weights")
    lora_base = os.path.abspath(init_from)
    try:  # the architecture and the weights from the checkpoint; iteration 0 and a new optimizer here
        model, base = load_checkpoint(init_from, device,
                                      dropout=None if dropout == architecture_defaults['dropout'] else dropout)
        base_tokenizer = load_tokenizer(init_from, (base.get('config') or {}).get('dataset'))
        data_tokenizer = dataset_tokenizer()
        # ordinary text must get the same ids; the data may add special tokens the model has room for
        if base_tokenizer.key != data_tokenizer.key or any(data_tokenizer.special_tokens.get(k) != v
                                                           for k, v in base_tokenizer.special_tokens.items()):
            raise ValueError(f"{init_from} was trained with another tokenizer ({base_tokenizer.name}) than {data_dir} "
                             f"({data_tokenizer.name}): prepare the data with the base model's tokenizer "
                             f"(--tokenizer_from=data/<its dataset>)")
        check_vocab(data_tokenizer, model.config.vocab_size)
    except ValueError as e:
        fail(str(e))
    base = None
elif init_from.startswith('gpt2') or os.path.isdir(init_from) or init_from.count('/') == 1:
    if master_process:
        print(f"Initializing from OpenAI GPT-2 weights: {init_from}")
    try:  # the architecture comes from the directory's config.json, whatever the settings say
        lora_base = os.path.abspath(init_from) if os.path.isdir(init_from) else init_from  # a hub id stays one
        if not init_from.startswith('gpt2'):
            init_from = pretrained_dir(init_from)  # a hub id ('HuggingFaceTB/SmolLM2-135M'): downloaded once
        # a PEFT adapter directory: its base with the adapter, trained on as LoRA (lora_rank=0: merged, all trained)
        model = load_pretrained(init_from, dropout, merge=not lora_rank)
        if has_lora(model):
            lora_base, lora_rank = peft_base(init_from), max(m.lora_A.shape[0] for m in model.modules()
                                                              if isinstance(m, LoRALinear))
        # a model with its own tokenizer (a Llama model's tokenizer.json, export.py's meta.pkl) learns only from data in it
        tokenizer_dir = pretrained_dir(peft_base(init_from)) if peft_base(init_from) else init_from
        if os.path.isdir(tokenizer_dir) and {'meta.pkl', 'tokenizer.json'} & set(os.listdir(tokenizer_dir)):
            if not same_tokenizer(load_tokenizer(tokenizer_dir), dataset_tokenizer()):
                raise ValueError(f"{tokenizer_dir} has another tokenizer than {data_dir}: prepare the data with it (for "
                                 f"conversations: data/chat/prepare.py --template_from={tokenizer_dir})")
            check_vocab(dataset_tokenizer(), model.config.vocab_size)
    except (ValueError, OSError) as e:
        fail(str(e))
else:
    fail(f"init_from must be 'scratch', 'resume', a gpt2 name, a local transformers directory, a hub id "
         f"(owner/name) or a model's out_dir, not '{init_from}'")
if block_size < model.config.block_size and model.config.learned_positions:
    model.crop_block_size(block_size)  # e.g. fine-tune GPT-2 (1024) on shorter windows
# a rotary or ALiBi model keeps the context it has (a Llama model's: its config's): only its windows here are shorter
elif block_size > model.config.block_size:
    fail(f"block_size {block_size} is larger than the model's {model.config.block_size}")
model_args = {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}
config.update({k: model_args[k] for k in architecture_defaults})  # the checkpoint records what this run trains
if lora_rank and fsdp:  # a resumed LoRA run too
    fail(LORA_FSDP)
if lora_rank and not has_lora(model):
    add_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets)
for module in model.modules():
    if isinstance(module, LoRALinear):
        module.lora_dropout.p = lora_dropout  # a training setting: this run's, on a resume too
config['lora_rank'] = lora_rank
if master_process:
    n_trained, n_all = trainable(model)
    print(f"trainable parameters: {n_trained:,} of {n_all:,} ({n_trained / n_all:.2%})"
          + (f": LoRA adapters of rank {lora_rank} over the frozen {lora_base}" if lora_rank else ''))
for split in ('train', 'val'):
    path = os.path.join(data_dir, f'{split}.bin')
    n_tokens = os.path.getsize(path) // data_dtype.itemsize
    if n_tokens <= block_size:
        fail(f"{path} has {n_tokens} tokens, too few for one block of {block_size}+1: use more data or a smaller block_size")
if masked:
    bos = meta.get('special_tokens', {}).get('<|bos|>')
    for split in ('train', 'val'):
        data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=data_dtype, mode='r')
        if bos is not None:
            starts[split] = np.flatnonzero(data[:len(data) - block_size] == bos)
        else:  # a model's own chat template: prepare.py marks each conversation's first token with a 2 in the mask
            mask = np.memmap(os.path.join(data_dir, f'{split}_mask.bin'), dtype=np.uint8, mode='r')
            starts[split] = np.flatnonzero(mask[:len(data) - block_size] == 2)
        if len(starts[split]) == 0:
            fail(f"{split}.bin has no conversation that starts {block_size}+1 tokens before its end: use a smaller block_size")


def tokens_per_byte():
    """Val targets (the counted ones) per byte of their text: loss / ln 2 times this is bits per
    byte, which compares across tokenizers. None when the tokenizer cannot be loaded here."""
    try:
        lengths = np.array(dataset_tokenizer().byte_lengths())
    except Exception as e:  # e.g. GPT-2's BPE files are neither cached nor downloadable
        print(f"no bits per byte: cannot load the tokenizer ({type(e).__name__}: {e})")
        return None
    targets = np.memmap(os.path.join(data_dir, 'val.bin'), dtype=data_dtype, mode='r')[1:]
    if masked and chat_loss == 'replies':
        targets = targets[np.memmap(os.path.join(data_dir, 'val_mask.bin'), dtype=np.uint8, mode='r')[1:] == 1]
    return targets_per_byte(targets, lengths)


val_tokens_per_byte = tokens_per_byte() if master_process else None
model.to(device)
for block in model.transformer.h:
    block.activation_checkpointing = activation_checkpointing
if fsdp:  # before the optimizer is built: it holds the sharded parameters
    model.shard(ptdtype if device_type == 'cuda' and dtype != 'float32' else None)
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
if master_process:
    print(f"tokens per iteration will be: {tokens_per_iter:,}")

# GradScaler: only float16 needs loss scaling; otherwise it does nothing
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))

optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type,
                                       optimizer=optimizer, muon_lr=muon_lr, muon_momentum=muon_momentum)


set_peak_lrs(optimizer, learning_rate, muon_lr)  # before a resumed state loads too: its groups carry the key


if checkpoint is not None and checkpoint.get('config', {}).get('optimizer', 'adamw') != config['optimizer']:
    fail(f"{ckpt_path} was trained with optimizer='{checkpoint['config']['optimizer']}': its state does not fit "
         f"optimizer='{config['optimizer']}'")
if checkpoint is not None:  # a resumed run: its weights (FSDP: from the shards) and optimizer state
    try:
        load_optimizer_state(model, optimizer, checkpoint, out_dir, ddp, fsdp)
    except ValueError as e:
        fail(str(e))
if checkpoint is not None and 'scaler' in checkpoint:
    scaler.load_state_dict(checkpoint['scaler'])
checkpoint = None  # free up memory
set_peak_lrs(optimizer, learning_rate, muon_lr)  # again: a resumed optimizer state brought the old run's

raw_model = model
if compile:
    if master_process:
        print("compiling the model... (takes a ~minute)")
    model = compiled(model, device)
if ddp and not fsdp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)

# copy the tokenizer next to the checkpoint, so out_dir alone is enough to sample
if master_process and os.path.exists(meta_path):
    shutil.copyfile(meta_path, os.path.join(out_dir, 'meta.pkl'))


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters random batches per split."""
    out = {}
    model.eval()
    for split in ('train', 'val'):
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            # fresh batches at each evaluation, as nanoGPT draws them, but seeded by the iteration
            # so a resumed run evaluates on the same batches as the uninterrupted one
            X, Y = get_batch(split, batch_generator('eval', split, iter_num, k))
            with ctx:
                logits, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean()
        if fsdp:  # every rank evaluated the same batches: averaging makes their save decisions agree bit for bit
            mean = out[split].to(device)  # nccl reduces GPU tensors only
            torch.distributed.all_reduce(mean)
            out[split] = mean.cpu() / ddp_world_size
    model.train()
    return out


@torch.no_grad()
def full_val_loss():
    """Loss over the whole val split, cut into consecutive non-overlapping windows."""
    data = np.memmap(os.path.join(data_dir, 'val.bin'), dtype=data_dtype, mode='r')
    mask = None
    if masked and chat_loss == 'replies':
        mask = np.memmap(os.path.join(data_dir, 'val_mask.bin'), dtype=np.uint8, mode='r')
    raw_model.eval()
    try:
        loss, _ = windowed_loss(raw_model, data, block_size, batch_size, device, ctx, mask)
    except ValueError as e:  # a token id past the vocabulary
        fail(f"{os.path.join(data_dir, 'val.bin')}: {e}")
    raw_model.train()
    return loss


def save():
    global saving, saved_iter
    shards = None
    if not fsdp and nonfinite(model=raw_model):  # (an FSDP rank holds a shard: the losses are checked instead)
        diverged(nonfinite(model=raw_model))
    if fsdp:  # collectives: every rank takes part
        saving = True  # as below: a Ctrl-C waits for this rank's part to be written
        try:
            shards = save_shards(raw_model, optimizer, out_dir, iter_num, master_process)
        except SaveError as e:
            fail(f"{e}; {last_checkpoint()}")
        # consolidated weights on rank 0 only, for sample.py, serve.py and export.py
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        model_state = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not master_process:
            saved_iter, saving = iter_num, False
            if pending_signal is not None:
                raise KeyboardInterrupt(pending_signal)
            return
    checkpoint = {
        # a LoRA run: the adapters alone, and (below) the base they adapt
        'model': model_state if fsdp else lora_state(raw_model) if lora_rank else raw_model.state_dict(),
        # under FSDP the optimizer state stays in the shards: no one downstream needs it consolidated
        **({'shards': shards} if fsdp else {'optimizer': optimizer.state_dict()}),
        'model_args': saved_model_args(model_args),
        'gelu_approximate': model_args['gelu_approximate'],
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'config': config,
        'scaler': scaler.state_dict(),
        **({'lora': dict(base=lora_base, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                         targets=lora_targets)} if lora_rank else {}),
    }
    # crash-safe (checkpoint.write_checkpoint): a kill at any moment leaves either the old or the new checkpoint, whole
    saving = True
    try:
        save_checkpoint(ckpt_path, checkpoint)
        saved_iter = iter_num
    except SaveError as e:  # a full disk, no permission: the partial file is gone
        fail(f"{e}; {last_checkpoint()}")
    finally:
        saving = False
    remove_old_shards(out_dir, keep=shards)  # also those of an FSDP run this one resumed
    if pending_signal is not None:  # a Ctrl-C that came during the save ends the run now that it is whole
        raise KeyboardInterrupt(pending_signal)


def last_checkpoint():
    if saved_iter is not None:
        return f"{ckpt_path} holds iteration {saved_iter}"
    return f"{ckpt_path} is as it was before this run" if os.path.exists(ckpt_path) else "no checkpoint was saved"


def diverged(what):
    fail(f"{what} at iteration {iter_num}: training diverged (try a lower learning_rate); stopped before saving it, "
         f"{last_checkpoint()}")


# logging
if wandb_log and master_process:
    try:
        import wandb
    except ImportError:  # not in requirements.txt: only wandb_log needs it
        fail("wandb_log=True needs wandb: pip install wandb")
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)


saving, pending_signal = False, None


def interrupted(signum, frame):
    global pending_signal
    if saving:  # an exception raised inside torch.save's writer can abort the process: finish the save first
        pending_signal = signum
    else:
        raise KeyboardInterrupt(signum)


# Ctrl-C and SIGTERM (a scheduler's stop, torchrun's shutdown) end the run with one line; one
# that arrives during a save takes effect as soon as the checkpoint is whole
signal.signal(signal.SIGINT, interrupted)
signal.signal(signal.SIGTERM, interrupted)


# progress: on a terminal a bar (loss, tok/s, ETA) with the evaluations printed above it; elsewhere (a file, CI,
# serve.py's page, which parses them) nanoGPT's log lines
bar = progress_bar(max_iters, iter_num) if master_process and not eval_only else None
# MFU means something against a GPU's peak; a CPU's only if the user gives its peak_flops
mfu_peak = peak_flops or (312e12 if device_type == 'cuda' else 0.0)

# training loop
reset_peak_memory(device)  # what training holds, not what loading the model did
t0 = time.time()
local_iter_num = 0  # iterations in this process's lifetime
running_mfu = -1.0
try:
    while True:
        # every eval_interval iterations, and at the end, the loss is evaluated and a checkpoint written
        evaluating = iter_num % eval_interval == 0 or iter_num == max_iters
        # dropout masks come from the global RNG: re-seed it from the iteration number at every
        # evaluation (where checkpoints are written) so a resumed run continues exactly
        if evaluating:
            torch.manual_seed(stable_seed(seed, 'dropout', seed_offset, iter_num))

        # set the learning rate of every group for this iteration
        lr = lr_at(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr) if decay_lr else learning_rate
        for group in optimizer.param_groups:
            group['lr'] = group['initial_lr'] * lr / learning_rate

        # evaluate the loss on train/val sets and write checkpoints
        if evaluating and (master_process or fsdp):  # FSDP: every rank joins every forward
            losses = estimate_loss()
            if not (math.isfinite(losses['train']) and math.isfinite(losses['val'])):
                diverged(f"the evaluated loss is {float(losses['val'])}")
            if master_process:
                bpb = f", val bpb {losses['val'] / math.log(2) * val_tokens_per_byte:.4f}" if val_tokens_per_byte else ''
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{bpb}")
            if wandb_log and master_process:
                wandb.log({"iter": iter_num, "train/loss": losses['train'], "val/loss": losses['val'], "lr": lr,
                           **({"mfu": running_mfu * 100} if running_mfu >= 0 else {})})
            if losses['val'] < best_val_loss or always_save_checkpoint:
                best_val_loss = min(best_val_loss, float(losses['val']))
                if iter_num > 0 and iter_num != saved_iter:  # after a resume, ckpt.pt already holds this iteration
                    if master_process:
                        print(f"saving checkpoint to {out_dir}")
                    save()
        if iter_num >= max_iters or (iter_num == 0 and eval_only):
            break

        # forward backward update, with gradient accumulation to simulate a larger batch
        step_loss = torch.zeros((), device=device)
        for micro_step in range(gradient_accumulation_steps):
            # number micro-batches across all ranks: N processes draw the same global batch as one
            X, Y = get_batch('train', batch_generator('train', iter_num, micro_step * ddp_world_size + ddp_rank))
            if ddp and fsdp:
                # reduce-scatter only on the last micro-step; until then each rank holds unsharded gradients
                raw_model.set_requires_gradient_sync(micro_step == gradient_accumulation_steps - 1)
            elif ddp:
                # all-reduce the gradients only on the last micro-step
                model.require_backward_grad_sync = (micro_step == gradient_accumulation_steps - 1)
            with ctx:
                logits, loss = model(X, Y)
                loss = loss / gradient_accumulation_steps  # scale the loss to account for gradient accumulation
            scaler.scale(loss).backward()
            step_loss += loss.detach()
        # a diverged run stops before its non-finite weights can reach a checkpoint (one sync an iteration;
        # with DDP every rank sees the sum, so they stop together)
        if ddp:
            torch.distributed.all_reduce(step_loss)
        if nonfinite(loss=step_loss.item()):
            diverged(nonfinite(loss=step_loss.item()))
        if grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        # timing and logging
        t1 = time.time()
        dt = t1 - t0
        t0 = t1
        if iter_num % log_interval == 0 and master_process:
            # loss.item() waits for the GPU; scale up to undo the division above (approximate: last micro-step only)
            lossf = loss.item() * gradient_accumulation_steps
            if local_iter_num >= 5 and mfu_peak:  # let the training loop settle a bit
                mfu = raw_model.estimate_mfu(batch_size * gradient_accumulation_steps, dt, mfu_peak, block_size)
                running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
            mfu_text = f", mfu {running_mfu * 100:.2f}%" if running_mfu >= 0 else ""  # measured from the 6th iteration
            if bar is None:
                print(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, "
                      f"{tokens_per_iter / dt:,.0f} tok/s{mfu_text}")
            else:
                rate = bar.format_dict['rate']  # iterations/s, smoothed as for the ETA (evaluations included)
                speed = f", {rate * tokens_per_iter:,.0f} tok/s" if rate else ''
                bar.set_postfix_str(f"loss {lossf:.4f}{speed}{mfu_text}", refresh=False)
        if local_iter_num == 1 and master_process:  # the optimizer's state exists from the first step on
            print(f"peak memory over the first two steps: {peak_memory(device)}")
        if bar is not None:
            bar.update(1)
        iter_num += 1
        local_iter_num += 1
except KeyboardInterrupt as e:
    if master_process:
        print(f"interrupted at iteration {iter_num}; {last_checkpoint()}")
    sys.exit(128 + (e.args[0] if e.args else signal.SIGINT))
finally:
    close_progress(bar)

if master_process and not eval_only:
    print(f"done: {last_checkpoint()}")
if eval_full_val and (master_process or fsdp):
    full_loss = full_val_loss()
    if master_process:
        bpb = f", bpb {full_loss / math.log(2) * val_tokens_per_byte:.4f}" if val_tokens_per_byte else ''
        print(f"full val loss {full_loss:.4f}{bpb}")
if ddp:
    torch.distributed.barrier()  # tear down together: a rank leaving early can abort another's gloo threads
    destroy_process_group()
    # gloo's worker threads may still hold finished work whose destruction during interpreter shutdown
    # aborts the process ("terminate called without an active exception") after all is done: run the exit
    # handlers (the out_dir lock, wandb) now and leave without that teardown
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(0)
