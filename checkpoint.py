"""
Checkpoints: one loader every script reads a model through (load_checkpoint), one crash-safe writer
(write_checkpoint) every training script saves with, and the sharded form an FSDP run saves besides.

out_dir/ckpt.pt holds nanoGPT's keys: 'model' (the state dict), 'model_args' (GPTConfig's arguments;
a switch only when it is not GPT-2's default, so a plain checkpoint loads in nanoGPT too), 'iter_num',
'best_val_loss', 'config' (the run's settings), the optimizer's state ('optimizer', or under FSDP
'shards', a directory beside it) and 'scaler'. A LoRA run's 'model' holds its adapters alone and 'lora'
names the base they adapt ('base': an out_dir, a transformers directory, a gpt2 name or a hub id); the
loader loads that base and the adapters over it, merged unless asked not to.
"""
import contextlib
import glob
import json
import os
import shutil
import sys
import warnings

import torch

import hf
from configurator import write_settings
from lora import load_lora, merge_lora
from model import GPT, GPTConfig
from tokenizer import pretrained_dir


def load_checkpoint(out_dir, device='cpu', dropout=None, merge=True):
    """A GPT from out_dir/ckpt.pt (written by train.py, or by nanoGPT's) and the rest of the
    checkpoint (optimizer state, iter_num, config, ...). Every script loads through here. A
    checkpoint is data: weights_only=True refuses one that would run code when unpickled.
    dropout: another rate to train on (a training setting, not part of the architecture).
    A LoRA run's checkpoint: its base with the adapters merged in, or (merge=False) attached, to train on."""
    path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one with train.py, or set --out_dir")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        model_args = dict(checkpoint['model_args'])
        model_args.setdefault('gelu_approximate', checkpoint.get('gelu_approximate', 'none'))
        if dropout is not None:
            model_args['dropout'] = dropout
        config = GPTConfig(**model_args)
        # nanoGPT's checkpoints of compiled models carry this prefix on every key
        state = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint.pop('model').items()}
        if 'lora' in checkpoint:
            return lora_model(checkpoint, config, state, device, merge), checkpoint
        # the weights must fit model_args before the model is allocated: model_args alone may ask for terabytes
        with torch.device('meta'):
            expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
        misfits = [f"{k} is missing" for k in expected if k not in state] + \
                  [f"{k} is not in the model" for k in state if k not in expected] + \
                  [f"{k} is {tuple(state[k].shape)}, not {expected[k]}" for k in expected
                   if k in state and tuple(state[k].shape) != expected[k]]
        if misfits:
            raise ValueError(f"its weights do not fit its model_args: {misfits[0]}"
                             f"{f' (and {len(misfits) - 1} more)' if len(misfits) > 1 else ''}")
        model = GPT(config)
        model.load_state_dict(state)
    except Exception as e:  # a truncated file, a pickle that is not plain data, weights of another shape
        raise ValueError(f"cannot load {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return model, checkpoint


def lora_model(checkpoint, config, state, device, merge):
    """A LoRA run's model: its base (which must have the architecture the run recorded), then the adapters."""
    lora = checkpoint['lora']
    base = lora['base']
    if os.path.isfile(os.path.join(base, 'ckpt.pt')):
        model, _ = load_checkpoint(base, device, dropout=config.dropout)
    else:
        model = load_pretrained(base, dropout=config.dropout)
    if model.config.learned_positions and config.block_size < model.config.block_size:
        model.crop_block_size(config.block_size)  # the run trained on shorter windows
    differ = [f"{k}={getattr(model.config, k)!r}, not {v!r}" for k, v in vars(config).items()
              if k not in ('dropout', 'block_size') and getattr(model.config, k) != v]
    if differ:
        raise ValueError(f"its base {base} is not the model its adapters were trained on: {differ[0]}")
    load_lora(model.to(device), state, lora.get('dropout', 0.0))
    return merge_lora(model) if merge else model


def peft_base(path):
    """The base model a PEFT adapter directory names (adapter_config.json's base_model_name_or_path), or None
    when path is no such directory."""
    try:
        with open(os.path.join(path, 'adapter_config.json')) as f:
            return json.load(f)['base_model_name_or_path']
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_pretrained(name_or_path, dropout=0.0, merge=True):
    """GPT.from_pretrained, and for a PEFT LoRA adapter directory (adapter_model.safetensors beside an
    adapter_config.json naming its base) that base with the adapter over it: merged, or (merge=False)
    attached to train on."""
    base = peft_base(name_or_path)
    if base is None:
        return GPT.from_pretrained(name_or_path, dict(dropout=dropout))
    from safetensors.torch import load_file
    model = GPT.from_pretrained(pretrained_dir(base), dict(dropout=dropout))
    with open(os.path.join(name_or_path, 'adapter_config.json')) as f:
        peft_config = json.load(f)
    theirs = load_file(os.path.join(name_or_path, 'adapter_model.safetensors'))
    load_lora(model, hf.from_peft(hf.hf_arch(model.config), model.config, peft_config, theirs),
              peft_config.get('lora_dropout', 0.0))
    return merge_lora(model) if merge else model


def write_checkpoint(path, checkpoint):
    """Save a checkpoint dict crash-safe: into a temporary file beside path, flushed to disk, then
    renamed over path. A kill at any moment leaves the old checkpoint or the new one, whole; on an
    exception the temporary file is removed and the exception passes on. Every training script saves
    through here (common.lock_out_dir removes a temporary ckpt.pt.<pid>.tmp that a killed run left behind)."""
    tmp_path = f'{path}.{os.getpid()}.tmp'
    try:
        with open(tmp_path, 'wb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        raise


class SaveError(Exception):
    """A checkpoint that could not be written, in one line; whatever ckpt.pt held before is still whole."""


def save_checkpoint(path, checkpoint):
    """write_checkpoint, with a failure (a full disk, no permission) as a SaveError saying why and how much
    the checkpoint needed. A checkpoint with the run's settings ('config') gets them beside it as
    config.yaml, readable and rerunnable (`python train.py out/config.yaml`)."""
    try:
        write_checkpoint(path, checkpoint)
        if checkpoint.get('config'):
            write_settings(os.path.join(os.path.dirname(path), 'config.yaml'), checkpoint['config'],
                           os.path.basename(sys.argv[0]) or 'train.py')
    except Exception as e:
        # torch.save reports a failed write as a RuntimeError raised while handling the OSError
        chain = [e]
        while chain[-1].__cause__ or chain[-1].__context__:
            chain.append(chain[-1].__cause__ or chain[-1].__context__)
        os_error = next((c for c in chain if isinstance(c, OSError) and c.strerror), None)
        reason = os_error.strerror if os_error else f"{type(e).__name__}: {e}".splitlines()[0]
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise SaveError(f"could not save the checkpoint to {path}: {reason} (it needs "
                        f"{megabytes(tensor_bytes(checkpoint))}, {megabytes(free)} free)") from e


def tensor_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def megabytes(n):
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def saved_model_args(model_args):
    """model_args as a checkpoint records them: nanoGPT's keys, and an architecture switch only where it
    differs from GPT-2, so a plain GPT-2-style checkpoint loads in nanoGPT's own sample.py too."""
    defaults = GPTConfig.__dataclass_fields__
    return {k: v for k, v in model_args.items()
            if k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout')
            or (k != 'gelu_approximate' and v != defaults[k].default
                and not (k == 'n_kv_head' and v == model_args['n_head']))}


# ---------------------------------------------------------------------------------------------
# FSDP: each rank's shard of the weights and optimizer state, in a directory that ckpt.pt names

def dcp_reason(e):
    """One line for a failed sharded save or load: torch.distributed.checkpoint wraps each rank's exception."""
    import torch.distributed.checkpoint as dcp
    if isinstance(e, dcp.CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    return e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or type(e).__name__).splitlines()[0]


def save_shards(model, optimizer, out_dir, iter_num, master):
    """Every rank writes its shard into out_dir/ckpt-shards.tmp, which the master renames to
    ckpt-shards-<iter>; ckpt.pt names the directory, so its own atomic rename commits both. Returns the
    name; SaveError when it could not be written (the temporary directory is gone)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    tmp_dir = os.path.join(out_dir, 'ckpt-shards.tmp')
    name = f'ckpt-shards-{iter_num:06d}'
    try:
        dcp.save(dict(zip(('model', 'optimizer'), get_state_dict(model, optimizer))), checkpoint_id=tmp_dir)
        if master:
            # a new name every time: the directory the current ckpt.pt names stays whole until ckpt.pt moves on
            for n in range(1, 1000):
                if not os.path.exists(os.path.join(out_dir, name)):
                    break
                name = f'ckpt-shards-{iter_num:06d}-{n}'
            os.rename(tmp_dir, os.path.join(out_dir, name))
    except (Exception, dcp.CheckpointException) as e:  # a full disk, no permission; an interrupt passes on
        if master:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise SaveError(f"could not save the sharded checkpoint to {tmp_dir}: {dcp_reason(e)}") from e
    return name


def remove_old_shards(out_dir, keep):
    for path in glob.glob(os.path.join(out_dir, 'ckpt-shards-*')):
        if os.path.basename(path) != keep:
            shutil.rmtree(path, ignore_errors=True)


def load_optimizer_state(model, optimizer, checkpoint, out_dir, distributed, fsdp):
    """The weights and optimizer state a resumed run continues from, into `model` and `optimizer`: from the
    shards of a run saved under FSDP (resharded to this run's ranks, or none), or from ckpt.pt's 'optimizer'
    (sharded here when this run is FSDP's). ValueError in one line for a missing or damaged shard."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_optimizer_state_dict,
                                                         set_state_dict)
    if 'shards' in checkpoint:
        shards_dir = os.path.join(out_dir, checkpoint['shards'])
        if not os.path.exists(os.path.join(shards_dir, '.metadata')):
            raise ValueError(f"cannot load the sharded checkpoint {shards_dir}: it is missing or incomplete")
        state = dict(zip(('model', 'optimizer'), get_state_dict(model, optimizer)))
        try:
            with warnings.catch_warnings():  # in one process it warns that it loads in one process
                warnings.simplefilter('ignore')
                dcp.load(state, checkpoint_id=shards_dir, no_dist=not distributed)
        except (Exception, dcp.CheckpointException) as e:  # a damaged shard
            raise ValueError(f"cannot load the sharded checkpoint {shards_dir}: {dcp_reason(e)}")
        set_state_dict(model, optimizer, model_state_dict=state['model'], optim_state_dict=state['optimizer'])
    elif fsdp:
        # saved without FSDP: its optimizer state numbers the parameters in the groups' order; name them and shard it
        names = {p: n for n, p in model.named_parameters()}
        fqns = [names[p] for group in optimizer.param_groups for p in group['params']]
        saved = checkpoint['optimizer']
        set_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True), optim_state_dict={
            'state': {fqns[i]: state for i, state in saved['state'].items()},
            'param_groups': [{**group, 'params': [fqns[i] for i in group['params']]} for group in saved['param_groups']]})
    else:
        optimizer.load_state_dict(checkpoint['optimizer'])
