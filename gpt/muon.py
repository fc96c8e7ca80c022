"""Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks",
https://kellerjordan.github.io/posts/muon/), written from that description, and the optimizer a GPT run uses.

Muon, for each 2-D hidden weight W with gradient G:
    B <- mu B + G                        SGD momentum (mu = 0.95)
    U <- G + mu B                        Nesterov
    O <- NewtonSchulz5(U)                ~ the nearest semi-orthogonal matrix, U V^T of U's SVD U S V^T
    W <- W - lr max(1, rows / cols)^0.5 O
Embeddings, the (tied) head, norms and biases stay with AdamW, as in the post.
"""
import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # the post's quintic: steep at 0, so small singular values grow fast


@torch.no_grad()
def newton_schulz(G, steps=5, eps=1e-7):
    """Quintic Newton-Schulz iteration: X <- a X + b (X X^T) X + c (X X^T)^2 X, from X = G / ||G||_F (so every
    singular value starts in (0, 1]). Each step maps a singular value s to a s + b s^3 + c s^5; five steps take
    them all to roughly 0.7 .. 1.2 (not exactly 1: the coefficients trade accuracy for speed), keeping the singular
    vectors. Runs in float32 (the post uses bfloat16 on GPUs)."""
    a, b, c = NS_COEFFS
    X = G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide side: X X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT  # (rows, rows)
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D parameters only (see the module docstring)."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        for group in self.param_groups:
            assert all(p.dim() == 2 for p in group["params"]), "Muon updates 2-D matrices only"

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(g)
                buf = self.state[p]["momentum_buffer"]
                buf.mul_(mu).add_(g)  # B <- mu B + G
                update = g.add(buf, alpha=mu) if group["nesterov"] else buf  # G + mu B
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5  # tall matrices: the same RMS update per entry
                p.add_(newton_schulz(update, group["ns_steps"]), alpha=-group["lr"] * scale)


class MuonWithAdamW:
    """Muon for the hidden matrices and AdamW for the rest, stepped together: to the training loop it is one
    optimizer (param_groups, step, zero_grad, state_dict). A group's `lr_scale` is its lr relative to the
    schedule's (Muon: muon_lr / lr)."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self):
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def make_optimizer(model, cfg, device):
    """AdamW with weight decay on matrices and embeddings only (cfg.optimizer == "adamw", the paper's recipe);
    or Muon (lr cfg.muon_lr, no weight decay, as in the post) for the 2-D weights inside the blocks and that AdamW
    for the embeddings, the tied head, norms and biases."""
    hidden = [p for p in model.blocks.parameters() if p.dim() == 2] if cfg.optimizer == "muon" else []
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in ids]
    decay = [p for p in rest if p.dim() >= 2]  # weight decay on matrices and embeddings only
    no_decay = [p for p in rest if p.dim() < 2]
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                              fused=device.type in ("cuda", "cpu"))
    if not hidden:
        return adamw
    muon = Muon([{"params": hidden, "lr_scale": cfg.muon_lr / cfg.lr}], lr=cfg.muon_lr, momentum=0.95)
    return MuonWithAdamW(muon, adamw)
