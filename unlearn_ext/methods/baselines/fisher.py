"""Fisher forgetting (Golatkar et al., CVPR 2020) with the rule of Deep Unlearn's ``munl/unlearning/fisher.py``
(``fisher_new``/``hessian``/``get_mean_var``, after github.com/OPTML-Group/Unlearn-Sparse), in
github.com/xcadet/deepunlearn."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..base import Method, register_method
from ..common import batches, dataset_of, device_of
from ..hparams import AT_LEAST_ONE, NONNEGATIVE


@register_method
class FisherForgetting(Method):
    """θ ← θ + sqrt(v)·N(0, I) (seeded), with, per parameter tensor,

    * F = (1/B) Σ_batches Σ_y mean_i p(y|x_i) · (∇_θ mean-batch ℓ(x, y))² — the diagonal Fisher of D_r,
      estimated on D_r re-batched in order at ``batch_size`` (64, the original's), model in eval mode,
      B the number of batches;
    * v = α·min(1/(F + 1e-8), 1e3) (1e2 for the classifier, detected as a parameter whose first dimension
      is the number of classes), averaged over dim 1 for tensors of ≥ 2 dimensions, ×10 for the classifier
      and for 1-D parameters.

    Default α = 0.2, the original's (Unlearn-Sparse's ``--alpha``); Deep Unlearn then tunes it per data set
    and model. On small models it is strong: noise std up to sqrt(0.2·1e3) ≈ 14 per weight.
    """

    name = "fisher"
    needs_retain = True
    defaults = {"alpha": 0.2, "batch_size": 64, "seed": 0}
    ranges = {"alpha": NONNEGATIVE, "batch_size": AT_LEAST_ONE}

    def _run(self, model, forget, retain, store, hp):
        params = [p for p in model.parameters() if p.requires_grad]
        device = device_of(model)
        fisher = [torch.zeros_like(p) for p in params]
        model.eval()
        n_batches, num_classes = 0, None
        data = DataLoader(dataset_of(self.name, "retain", retain), batch_size=hp["batch_size"], shuffle=False)
        for x, _, _ in batches(data, device):
            out = model(x)
            num_classes = out.shape[1]
            prob = F.softmax(out, dim=1).detach().mean(0)
            for c in range(num_classes):
                target = torch.full((len(x),), c, dtype=torch.long, device=device)
                grads = torch.autograd.grad(F.cross_entropy(out, target), params, retain_graph=True)
                for acc, g in zip(fisher, grads):
                    acc.addcmul_(g, g, value=float(prob[c]))
            n_batches += 1
        gen = torch.Generator(device=device).manual_seed(hp["seed"])
        with torch.no_grad():
            for p, f in zip(params, fisher):
                p.add_(self.noise_std(f / n_batches, p, num_classes, hp["alpha"])
                       * torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype))
        return {"fisher_batches": n_batches}

    @staticmethod
    def noise_std(fisher, p, num_classes: int, alpha: float):
        """sqrt(v) of the class docstring for parameter ``p`` with diagonal Fisher ``fisher``."""
        classifier = p.ndim > 0 and p.shape[0] == num_classes
        var = (1.0 / (fisher + 1e-8)).clamp(max=1e2 if classifier else 1e3) * alpha
        if p.ndim > 1:
            var = var.mean(dim=1, keepdim=True).expand_as(p)
        if classifier or p.ndim == 1:
            var = var * 10
        return var.sqrt()
