"""
Muon: MomentUm Orthogonalized by Newton-Schulz (Keller Jordan et al., 2024), the optimizer
for the 2-D weight matrices inside the transformer blocks. GPT.configure_optimizers builds
it; train.py drives it like any torch optimizer, also on an FSDP-sharded model.
"""
import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def newton_schulz(G, steps=5, eps=1e-7):
    """Approximately orthogonalise G (push its singular values towards 1) with a quintic
    Newton-Schulz iteration; coefficients (3.4445, -4.7750, 2.0315) from the Muon write-up.
    It only needs matmuls, so it runs in bfloat16 on a GPU."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = X.size(0) > X.size(1)
    if transposed:
        X = X.T  # iterate on the wide side: X @ X.T is then the smaller Gram matrix
    X = X / (X.norm() + eps)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    if transposed:
        X = X.T
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the groups with use_muon=True (2-D weight matrices): SGD-momentum (Nesterov)
    whose update is orthogonalised by newton_schulz, scaled by sqrt(max(1, rows/cols)).
    Groups with use_muon=False get a plain AdamW update, so one optimizer (one state_dict,
    one learning-rate schedule) drives the whole model."""

    def __init__(self, param_groups):
        defaults = dict(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, betas=(0.9, 0.95), eps=1e-8,
                        weight_decay=0.0, use_muon=True)
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group['lr'], group['weight_decay']
            for p in group['params']:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if wd:
                    p.mul_(1 - lr * wd)  # decoupled weight decay, as AdamW
                if group['use_muon']:
                    if 'momentum_buffer' not in state:
                        state['momentum_buffer'] = torch.zeros_like(g)
                    buf = state['momentum_buffer']
                    buf.mul_(group['momentum']).add_(g)
                    g = g.add(buf, alpha=group['momentum']) if group['nesterov'] else buf
                    if isinstance(g, DTensor):
                        # FSDP: every rank gathers the full matrix and orthogonalises it (the same result
                        # everywhere), then keeps its own rows; momentum stays sharded. Simple, at the cost
                        # of an all-gather and world_size-fold Newton-Schulz work per matrix.
                        update = distribute_tensor(newton_schulz(g.full_tensor(), steps=group['ns_steps']),
                                                   g.device_mesh, g.placements, src_data_rank=None)
                    else:
                        update = newton_schulz(g, steps=group['ns_steps'])
                    p.add_(update, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)
                else:
                    if 'step' not in state:
                        state['step'] = 0
                        state['exp_avg'] = torch.zeros_like(p)
                        state['exp_avg_sq'] = torch.zeros_like(p)
                    state['step'] += 1
                    beta1, beta2 = group['betas']
                    state['exp_avg'].lerp_(g, 1 - beta1)
                    state['exp_avg_sq'].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    bias1 = 1 - beta1 ** state['step']
                    bias2 = 1 - beta2 ** state['step']
                    denom = (state['exp_avg_sq'] / bias2).sqrt_().add_(group['eps'])
                    p.addcdiv_(state['exp_avg'], denom, value=-lr / bias1)
        return loss
