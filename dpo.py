"""
Direct preference optimization (DPO, Rafailov et al., 2023): train a chat model on pairs of replies, one
chosen and one rejected, so that it prefers the chosen more than the starting model (the reference) does.
The loss per pair is -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), each term a reply's summed
log-probability (its tokens only) under the policy pi or the reference: TRL's DPOTrainer's default.
With LoRA (lora_rank > 0) the reference is the same model with its adapters off: no second copy.

$ python dpo.py --init_from=out-chat --data=pairs.jsonl --out_dir=out-dpo --beta=0.1
$ python dpo.py --init_from=out-chat --data=pairs.jsonl --out_dir=out-dpo-lora --lora_rank=8
$ python dpo.py --out_dir=out-dpo --init_from=resume --max_iters=400   # continue, exactly

--data is JSONL in TRL's conversational preference format ({"prompt": [messages], "chosen": [messages],
"rejected": [messages]}) or the hub's ultrafeedback_binarized shape ({"prompt": "...", "chosen": [whole
conversation], "rejected": [whole conversation]}); see preference.py. The out_dir loads in sample.py,
chat_eval.py and serve.py like train.py's.
"""
import math
import os
import pickle
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import SaveError, load_checkpoint, load_pretrained, peft_base, save_checkpoint, saved_model_args
from common import (autocast, check_training_settings, init_distributed, lock_out_dir, lr_at, nonfinite, peak_memory,
                    reset_peak_memory, resolve_dtype, set_peak_lrs, stable_seed)
from configurator import configure, fail
from lora import TARGETS as LORA_TARGETS, LoRALinear, adapters_off, add_lora, has_lora, lora_state, trainable
from model import GPTConfig
from preference import batch, dpo_loss, encode_reply, read_pairs, reply_logps
from tokenizer import check_vocab, hf_tokenizer_meta, load_tokenizer, meta_path_for, pretrained_dir

# -----------------------------------------------------------------------------
out_dir = 'out-dpo'
init_from = 'out-chat'  # the chat model to start from (the reference): an out_dir, a transformers or PEFT directory,
#   a hub id; or 'resume' (continue out_dir)
data = ''  # JSONL of preference pairs (see above)
val_fraction = 0.05  # the last pairs held out for the evaluations' reward accuracy
beta = 0.1  # DPO's temperature: how far from the reference the policy may move for a preference
batch_size = 4  # pairs per micro-step
gradient_accumulation_steps = 1
max_iters = 200
eval_interval = 50  # evaluate on the held-out pairs and save a checkpoint
log_interval = 1
learning_rate = 1e-6  # TRL's default; LoRA takes ~100x more
min_lr = 0.0
warmup_iters = 10
lr_decay_iters = 200
decay_lr = False
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0
dropout = 0.0  # 0: the policy and the reference see the same function at step 0 (TRL turns dropout off too)
lora_rank = 0  # > 0: train LoRA adapters over the frozen start (lora.py); the reference is it with the adapters off
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = 'all'
seed = 1337
device = 'cuda'
dtype = 'auto'
backend = 'auto'
# -----------------------------------------------------------------------------
configure(globals())
config = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
check_training_settings(globals())
if not math.isfinite(beta) or beta <= 0:
    fail(f"beta must be a finite number > 0, not {beta}")
if not 0 <= val_fraction < 1:
    fail(f"val_fraction must be >= 0 and < 1, not {val_fraction}")
if lora_targets not in LORA_TARGETS:
    fail(f"lora_targets must be one of {', '.join(LORA_TARGETS)}, not '{lora_targets}'")
if not data:
    fail("--data=FILE: the JSONL of preference pairs to train on")
try:  # the data before the model: a bad line is one error, before any loading
    pairs = read_pairs(data)
except ValueError as e:
    fail(str(e))
dtype, ptdtype = resolve_dtype(device, dtype)
ddp, rank, _, world, device = init_distributed(device, backend)
master = rank == 0
device_type = 'cuda' if 'cuda' in device else 'cpu'
ctx = autocast(device_type, dtype)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if init_from != 'resume' and os.path.abspath(init_from) == os.path.abspath(out_dir):
    fail("init_from is this run's out_dir: use init_from='resume' to continue it, or pick another out_dir")
if master:
    lock_out_dir(out_dir, 'dpo.py')
torch.manual_seed(seed)


def load_start(source, merge):
    """(model, tokenizer, meta to copy beside the checkpoint, the checkpoint or None) of an out_dir, a
    transformers directory, a PEFT adapter directory or a hub id."""
    if os.path.isfile(os.path.join(source, 'ckpt.pt')):
        model, ckpt = load_checkpoint(source, device, dropout=dropout, merge=merge)
        dataset = (ckpt.get('config') or {}).get('dataset')
        meta_path = meta_path_for(source, dataset)
        meta = read_pickle(meta_path) if meta_path else None
        return model, load_tokenizer(source, dataset), meta, ckpt
    path = pretrained_dir(source)
    model = load_pretrained(path, dropout, merge=merge)
    tokenizer_dir = pretrained_dir(peft_base(path)) if peft_base(path) else path
    return model.to(device), load_tokenizer(tokenizer_dir), hf_tokenizer_meta(tokenizer_dir), None


def read_pickle(path):
    with open(path, 'rb') as f:
        return pickle.load(f)


# the model, the reference, the tokenizer
iter_num, checkpoint, saved_iter = 0, None, None
try:
    if init_from == 'resume':
        if not os.path.exists(ckpt_path):
            raise ValueError(f"init_from='resume' but there is no checkpoint at {ckpt_path}")
        model, tokenizer, meta, checkpoint = load_start(out_dir, merge=False)
        start = checkpoint['config']['dpo_start']
        lora_rank = (checkpoint.get('lora') or {}).get('rank', 0)
        iter_num = saved_iter = checkpoint['iter_num']
    else:
        start = init_from if not os.path.isdir(init_from) else os.path.abspath(init_from)
        # a PEFT adapter merged in too: the start is the reference, and new adapters go over all of it
        model, tokenizer, meta, _ = load_start(init_from, merge=True)
    if lora_rank and not has_lora(model):
        add_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets)
    # without adapters to turn off, the reference is a frozen copy of the starting model
    reference = None if lora_rank else load_start(start, merge=True)[0].eval().requires_grad_(False)
    check_vocab(tokenizer, model.config.vocab_size)
    encoded = [(encode_reply(tokenizer, p, c), encode_reply(tokenizer, p, r)) for p, c, r in pairs]
except (FileNotFoundError, ValueError, OSError) as e:
    fail(str(e))
config['dpo_start'] = start
for module in model.modules():
    if isinstance(module, LoRALinear):
        module.lora_dropout.p = lora_dropout
fits = [i for i, (c, r) in enumerate(encoded) if max(len(c[0]), len(r[0])) - 1 <= model.config.block_size]
if len(fits) < len(encoded) and master:
    print(f"{len(encoded) - len(fits)} of {len(encoded)} pairs are longer than the model's "
          f"{model.config.block_size} positions: left out")
n_val = int(len(fits) * val_fraction)
train_ids, val_ids = fits[:len(fits) - n_val], fits[len(fits) - n_val:]
if not train_ids:
    fail(f"{data}: no pair fits the model's {model.config.block_size} positions")
model.to(device)
model.train()
if master:
    n_trained, n_all = trainable(model)
    print(f"{len(train_ids)} train and {len(val_ids)} held-out pairs; trainable parameters: {n_trained:,} of "
          f"{n_all:,} ({n_trained / n_all:.2%}); the reference: "
          f"{'the same model, adapters off' if lora_rank else 'a frozen copy of ' + start}")
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
set_peak_lrs(optimizer, learning_rate, 0.0)
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
    set_peak_lrs(optimizer, learning_rate, 0.0)
checkpoint = None
raw_model = model
if ddp:
    model = DDP(model, device_ids=[int(device.split(':')[1])] if device_type == 'cuda' else None)
if master and meta is not None:
    with open(os.path.join(out_dir, 'meta.pkl'), 'wb') as f:
        pickle.dump(meta, f)


def pair_stats(ids, net):
    """DPO's losses and the chosen and rejected rewards of the pairs `ids`, the policy's (net's) graph kept."""
    x, y = batch([encoded[i][0] for i in ids] + [encoded[i][1] for i in ids], device)
    with ctx:
        policy = reply_logps(net(x, y)[0], y)
        with torch.no_grad():
            if reference is None:
                with adapters_off(raw_model):
                    ref = reply_logps(raw_model(x, y)[0], y)
            else:
                ref = reply_logps(reference(x, y)[0], y)
    n = len(ids)
    return dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta)


def summary(losses, chosen, rejected):
    return (f"loss {losses.mean():.6f}, rewards chosen {chosen.mean():.4f} rejected {rejected.mean():.4f}, "
            f"accuracy {(chosen > rejected).float().mean():.3f}, margin {(chosen - rejected).mean():.4f}")


@torch.no_grad()
def evaluate():
    raw_model.eval()
    # the unwrapped model: only this rank evaluates, and a DDP forward would wait for the others
    stats = [pair_stats(val_ids[i:i + batch_size], raw_model) for i in range(0, len(val_ids), batch_size)]
    raw_model.train()
    return [torch.cat(parts) for parts in zip(*stats)]


def save():
    global saved_iter
    if nonfinite(model=raw_model):
        fail(f"{nonfinite(model=raw_model)} at iteration {iter_num}: training diverged (try a lower learning_rate); "
             f"not saved")
    ckpt = {'model': lora_state(raw_model) if lora_rank else raw_model.state_dict(),
            'optimizer': optimizer.state_dict(),
            'model_args': saved_model_args({k: getattr(raw_model.config, k) for k in GPTConfig.__dataclass_fields__}),
            'gelu_approximate': raw_model.config.gelu_approximate, 'iter_num': iter_num,
            'config': config,
            **({'lora': dict(base=start, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                             targets=lora_targets)} if lora_rank else {})}
    try:
        save_checkpoint(ckpt_path, ckpt)
    except SaveError as e:
        fail(str(e))
    saved_iter = iter_num


reset_peak_memory(device)  # what training holds, not what loading the models did
t0 = time.time()
start_iter = iter_num
while True:
    if (iter_num % eval_interval == 0 or iter_num == max_iters) and master:
        if val_ids:
            print(f"step {iter_num}: val {summary(*evaluate())}")
        if iter_num > 0 and iter_num != saved_iter:
            print(f"saving checkpoint to {out_dir}")
            save()
    if iter_num >= max_iters:
        break
    lr = lr_at(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr) if decay_lr else learning_rate
    for group in optimizer.param_groups:
        group['lr'] = group['initial_lr'] * lr / learning_rate
    stats = []
    for micro_step in range(gradient_accumulation_steps):
        # a pure function of (seed, iteration, micro-step): a resumed run draws the batches this one would
        g = torch.Generator().manual_seed(stable_seed(seed, 'dpo', iter_num, micro_step * world + rank))
        ids = [train_ids[i] for i in torch.randint(len(train_ids), (batch_size,), generator=g).tolist()]
        torch.manual_seed(stable_seed(seed, 'dropout', rank, iter_num, micro_step))
        if ddp:
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        losses, chosen, rejected = pair_stats(ids, model)
        (losses.mean() / gradient_accumulation_steps).backward()
        stats.append((losses.detach(), chosen, rejected))
    losses, chosen, rejected = [torch.cat(parts) for parts in zip(*stats)]
    step_loss = losses.mean()
    if ddp:
        torch.distributed.all_reduce(step_loss)
    if nonfinite(loss=step_loss.item()):
        fail(f"{nonfinite(loss=step_loss.item())} at iteration {iter_num}: training diverged (try a lower "
             f"learning_rate); stopped before saving it")
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t1 = time.time()
    if iter_num % log_interval == 0 and master:
        print(f"iter {iter_num}: {summary(losses, chosen, rejected)}, time {(t1 - t0) * 1000:.0f}ms")
    if iter_num == start_iter + 1 and master:  # the optimizer's state exists from the first step on
        print(f"peak memory over the first two steps: {peak_memory(device)}")
    t0 = t1
    iter_num += 1
if master:
    print(f"done: {ckpt_path} holds iteration {saved_iter}" if saved_iter is not None else "done: nothing saved")
if ddp:
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
sys.stdout.flush()
