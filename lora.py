"""
LoRA (Hu et al., 2021): a frozen Linear plus a trainable low-rank update, y = W x + s * B A x, with A
(rank x in) drawn as nn.Linear draws a weight and B (out x rank) zero, so a model with fresh adapters
computes exactly what its base does. Only A and B train: their AdamW moments are a few percent of the
base's, which is what lets a model fine-tune where full fine-tuning's optimizer state does not fit.

The adapted Linear keeps its own weight and bias under their names, so the base's state dict is the same
with or without adapters; the adapters are the extra keys '*.lora_A', '*.lora_B' (and in lora_state, each
module's scaling as '*.lora_scaling').
Imports nothing of the project: it works on any module tree of nn.Linears.
"""
import contextlib
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

# which Linears of a block each lora_targets adapts (names below transformer.h.<i>.)
TARGETS = {'attn': ('attn.c_attn', 'attn.c_proj'), 'mlp': ('mlp.c_fc', 'mlp.c_proj'),
           'all': ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj')}
KEYS = ('lora_A', 'lora_B', 'lora_scaling')


class LoRALinear(nn.Linear):
    """An nn.Linear (its weight and bias frozen) with a low-rank update added to its output. scaling is
    alpha / rank; an imported adapter may carry its own."""

    def __init__(self, linear, rank, scaling, dropout=0.0):
        with torch.device('meta'):  # the base's tensors are taken over below, not allocated again
            super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.weight, self.bias = linear.weight, linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        w = linear.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) draw A
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=torch.float32))
        self.lora_scaling = float(scaling)  # a number, not a buffer: DDP would broadcast a buffer at every forward
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_enabled = True  # False: the base alone (dpo.py's reference model)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.lora_enabled:
            return y
        h = F.linear(F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return y + h * self.lora_scaling

    def delta(self):
        """The update folded into one matrix, (out, in), float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.lora_scaling

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.lora_A.shape[0]}, scaling={self.lora_scaling:g}"


def target_names(model, targets):
    """The names of the Linears lora_targets adapts in a GPT; ValueError for an unknown targets."""
    if targets not in TARGETS:
        raise ValueError(f"lora_targets must be one of {', '.join(TARGETS)}, not '{targets}'")
    return [f'transformer.h.{i}.{t}' for i in range(len(model.transformer.h)) for t in TARGETS[targets]]


def replace(model, name, module):
    parent, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent), child, module)


def freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)


def add_lora(model, rank, alpha, dropout=0.0, targets='all'):
    """Freeze every weight of the model and give the targeted Linears fresh adapters of `rank`, scaled by
    alpha / rank: the model computes what it did, and only the adapters train. Returns the model."""
    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, not {rank}")
    names = target_names(model, targets)
    freeze(model)
    for name in names:
        replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha / rank, dropout))
    return model


def lora_state(model):
    """The adapters alone, each with its scaling: what a LoRA run's checkpoint holds of the model."""
    state = {k: v for k, v in model.state_dict().items() if k.rpartition('.')[2] in KEYS}
    state.update({f'{name}.lora_scaling': torch.tensor(m.lora_scaling) for name, m in model.named_modules()
                  if isinstance(m, LoRALinear)})
    return state


def load_lora(model, state, dropout=0.0):
    """Attach the adapters of `state` (lora_state's keys; each module's rank from its A) to the model, its
    own weights frozen. ValueError naming a key that fits no Linear of the model, or a shape that does not."""
    freeze(model)
    modules = sorted({k.rpartition('.')[0] for k in state})
    for name in modules:
        if any(f'{name}.{key}' not in state for key in KEYS):
            raise ValueError(f"the adapter of {name} is incomplete: it needs {', '.join(KEYS)}")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        A, B = state[f'{name}.lora_A'], state[f'{name}.lora_B']
        if not isinstance(linear, nn.Linear) or A.shape[1] != linear.in_features or B.shape != (linear.out_features, A.shape[0]):
            raise ValueError(f"the adapter of {name} ({tuple(B.shape)} x {tuple(A.shape)}) fits no Linear of this model")
        if not isinstance(linear, LoRALinear):
            replace(model, name, LoRALinear(linear, A.shape[0], 1.0, dropout))
        module = model.get_submodule(name)
        with torch.no_grad():
            module.lora_A.copy_(A)
            module.lora_B.copy_(B)
        module.lora_scaling = float(state[f'{name}.lora_scaling'])
    return model


def merge_lora(model):
    """Fold every adapter into its Linear's weight, W + s * B A, leaving plain nn.Linears: the model
    computes the same at the base's speed, and every other part of the project sees an ordinary GPT."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device='meta')
            with torch.no_grad():
                linear.weight = nn.Parameter((module.weight.float() + module.delta()).to(module.weight.dtype))
                if module.bias is not None:
                    linear.bias = nn.Parameter(module.bias.detach().clone())
            replace(model, name, linear)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def has_lora(model):
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextlib.contextmanager
def adapters_off(model):
    """The base model alone inside the block: the reference a preference loss compares with, with no
    second copy of the weights."""
    modules = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in modules:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.lora_enabled = True


def trainable(model):
    """(trainable parameters, all parameters), a tied weight counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
