"""
Inference-only versions of the model's Linears for a CPU, and for_inference, which swaps them in once a
model is loaded to generate with (textgen.load_model and bench.py call it). Training never sees them.
"""
import torch
import torch.nn as nn


class Int8Linear(nn.Module):
    """A Linear whose weight is held as int8 with one scale per output row (weight-only
    quantization): a decode step streams a quarter of float32's bytes. The input keeps its dtype."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # symmetric: the row's largest weight maps to 127
        self.register_buffer('weight', (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer('scale', scale.to(linear.weight.dtype))
        self.register_buffer('bias', None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        if x.device.type == 'cpu':  # PyTorch's CPU kernel multiplies by the int8 matrix directly
            # its float32 path is ~10x slower than plain float32 (measured): float32 inputs go through bfloat16
            a = flat.to(torch.bfloat16) if flat.dtype == torch.float32 else flat
            y = torch.ops.aten._weight_int8pack_mm(a, self.weight, self.scale.to(a.dtype)).to(x.dtype)
        else:
            y = (flat @ self.weight.to(x.dtype).t()) * self.scale.to(x.dtype)
        y = y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class PackedLinear(nn.Module):
    """A Linear for CPU inference whose weight oneDNN has reordered once into its own blocked
    layout. A decode step multiplies a few rows by every weight, so it is bound by reading them:
    from this layout oneDNN reads ~1.6x (bfloat16) to ~2.3x (float32) faster than from nn.Linear's
    (measured on GPT-2's matrices, 1 row, 2 cores). The same numbers come out, summed in another order."""

    def __init__(self, linear):
        super().__init__()
        # an opaque oneDNN tensor, so a plain attribute: it stays out of state_dict and .to()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, 'none', [], '')


def for_inference(model, device, dtype, quantize='', pack=True):
    """Make `model` ready to generate with, in place: eval mode, the weights cast once to `dtype`
    (not autocast on every op), and on a CPU every Linear (the head too; a tied head gets its own
    copy, the embedding keeps `dtype`) swapped for a faster one: Int8Linear with quantize='int8',
    else PackedLinear (float32 and bfloat16, where this PyTorch has oneDNN; pack=False keeps
    nn.Linear, for bench.py to show the difference). textgen.load_model and bench.py call it."""
    if quantize not in ('', 'int8'):
        raise ValueError(f"quantize must be '' or 'int8', not '{quantize}'")
    model.eval().to(device=device, dtype=dtype)
    if quantize == 'int8':
        swap = Int8Linear
    elif pack and device == 'cpu' and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available():
        swap = PackedLinear
    else:
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, swap(child))
    return model
