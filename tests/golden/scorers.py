"""Reference value of every scorer on the NB201 fixtures, computed independently in PyTorch
(float64, batch-of-one train() loop, so per-sample BatchNorm) with the formulas of
docs/semantics.md; the baselines follow zero-cost-nas, with the batch gradient = Σ per-sample gradients.
Fisher is computed from forward/backward hooks on the layer outputs (zero-cost-nas' way), not from
the parameter-gradient identity gradalign uses, so it checks that identity too.

    pip install torch==2.8.0 onnx==1.23.2 numpy
    python3 tests/golden/scorers.py          # writes tests/golden/scores.json (N = 20, shipped probe)
    python3 tests/golden/scorers.py --only az_trainability   # recomputes that entry alone
"""
import copy
import json
import os
import sys

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

sys.path.insert(0, os.path.dirname(__file__))
import nb201  # noqa: E402
from make_fixtures import FIXTURES, ROOT, cifar_probe  # noqa: E402

N = 20
EPS = 1e-6


def load_fixture(i, name, arch):
    model = nb201.build(arch, seed=100 + i)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(os.path.join(ROOT, "models", f"{name}.onnx")).graph.initializer}
    sd = model.state_dict()
    for k in sd:
        if not k.endswith("num_batches_tracked"):
            sd[k] = torch.from_numpy(inits[k].copy())
    model.load_state_dict(sd)
    return model.double().train()


def per_sample(model, x, y):
    rows = []
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(torch.from_numpy(x[i:i + 1]).double()), torch.from_numpy(y[i:i + 1])).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).detach().numpy().copy())
    return np.stack(rows)


def weight_blocks(model):
    """(name, module, slice) of every Conv2d/Linear weight in parameter order."""
    offs, off = {}, 0
    for n, p in model.named_parameters():
        offs[n] = slice(off, off + p.numel())
        off += p.numel()
    return [(n, m, offs[n + ".weight"]) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def classes(y):
    return {c: np.where(y == c)[0] for c in sorted(set(y.tolist()))}


def gradsign(s):
    return float(np.abs(s.sum(0)).sum())


def gradalign_i_dot(g, s, y):
    return float(sum((s[idx] @ np.sign(g[idx].mean(0))).mean() for idx in classes(y).values()))


def gradalign_i_cos(s, y):
    tot = []
    for idx in classes(y).values():
        sc = s[idx]
        m = sc.mean(0)
        cos = [(r @ m) / (np.linalg.norm(r) * np.linalg.norm(m)) if np.linalg.norm(r) > 0 and np.linalg.norm(m) > 0 else 0.0 for r in sc]
        tot.append(np.mean(cos))
    return float(np.mean(tot))


def gradalign_ii(s, y, normalise):
    tot = 0.0
    for idx in classes(y).values():
        k = s[idx] @ s[idx].T
        if normalise:
            d = np.sqrt(np.diag(k))
            outer = np.outer(d, d)
            k = np.where(outer > 0, k / np.where(outer > 0, outer, 1), 0.0)
        tot += np.linalg.slogdet(k + EPS * np.eye(len(idx)))[1]
    return float(tot)


def fisher_hooks(model, x, y):
    acts, total = {}, {}
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            def fwd(mod, inp, out, n=n):
                out.retain_grad()
                acts[n] = out
            hooks.append(m.register_forward_hook(fwd))
    per = {}
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(torch.from_numpy(x[i:i + 1]).double()), torch.from_numpy(y[i:i + 1])).backward()
        for n, a in acts.items():
            g = (a * a.grad).detach()
            g = g.sum(dim=tuple(range(2, g.dim()))) if g.dim() > 2 else g
            per.setdefault(n, []).append(g[0].numpy())
    for h in hooks:
        h.remove()
    return float(sum((0.5 * np.mean(np.stack(v) ** 2, axis=0)).sum() for v in per.values()))


def zico(g, blocks):
    tot = 0.0
    for _, _, sl in blocks:
        b = g[:, sl]
        std = b.std(0)
        nz = std != 0
        s = (np.abs(b).mean(0)[nz] / std[nz]).sum()
        if s != 0:
            tot += np.log(s)
    return float(tot)


def relu_codes(model, x):
    """ReLU codes (input > 0) per distinct ReLU input tensor. ONNX exporters merge two ReLUs of the same
    tensor into one node (common-subexpression elimination: an NB201 cell with two conv edges
    leaving one node), so an ONNX model cannot tell them apart; gradalign counts each distinct
    input once, and so does this reference (zero-cost-nas' module hooks would count it twice)."""
    codes = []
    for i in range(len(x)):
        cs, seen = [], []  # `seen` keeps the inputs alive, so identity is never reused

        def hook(mod, inp, out):
            if not any(t is inp[0] for t in seen):
                seen.append(inp[0])
                cs.append((inp[0] > 0).reshape(-1).double().numpy())
        hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU)]
        with torch.no_grad():
            model(torch.from_numpy(x[i:i + 1]).double())
        for h in hooks:
            h.remove()
        codes.append(np.concatenate(cs))
    return np.stack(codes)


def naswot(c):
    k = c @ c.T + (1 - c) @ (1 - c).T
    return float(np.linalg.slogdet(k)[1])


def swap(c):
    """SWAP (Peng et al., ICLR 2024, their swap.py): sign of the ReLU outputs, transposed to
    units × samples, the number of unique rows (torch.unique(dim=0))."""
    return float(torch.unique(torch.from_numpy(c.T), dim=0).shape[0])


def meco(feats):
    """MeCo (Jiang et al., NeurIPS 2023, their meco.py): per layer, the first sample's output as
    channels x spatial, torch.corrcoef, NaN -> 0, the smallest eigenvalue; summed over layers.
    gradalign takes the Conv outputs (the authors hook every module); per-sample BN, so the
    first sample's maps come from a batch of one."""
    vals = []
    for f in feats:
        c = torch.nan_to_num(torch.corrcoef(f[0].reshape(f.shape[1], -1)), nan=0.0, posinf=0.0, neginf=0.0)
        vals.append(float(torch.linalg.eigvalsh(c).min()))
    return float(sum(vals))


def conv_features(model, x):
    """Every Conv2d output of every sample (batch of one each, so per-sample BN), in call order,
    concatenated over the samples: one (N, C, H, W) tensor per layer."""
    per_layer = None
    for i in range(len(x)):
        outs = []
        hooks = [m.register_forward_hook(lambda mod, inp, out: outs.append(out.detach()))
                 for m in model.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            model(torch.from_numpy(x[i:i + 1]).double())
        for h in hooks:
            h.remove()
        per_layer = [[o] for o in outs] if per_layer is None else [a + [o] for a, o in zip(per_layer, outs)]
    return [torch.cat(v) for v in per_layer]


def conv_reaches_logits(model, x):
    """For each Conv2d (call order): whether d(sum of logits)/d(its output) is non-zero for some
    probe sample. gradalign decides the same statically (every path from the output multiplied
    by a constant zero); this is an independent, numerical check of that rule."""
    live = None
    for i in range(len(x)):
        outs = []

        def keep(mod, inp, out):
            out.retain_grad()
            outs.append(out)

        hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, nn.Conv2d)]
        model(torch.from_numpy(x[i:i + 1]).double()).sum().backward()
        for h in hooks:
            h.remove()
        flags = [o.grad is not None and bool((o.grad != 0).any()) for o in outs]
        live = flags if live is None else [a or b for a, b in zip(live, flags)]
    model.zero_grad()
    return live


def az_layer_expressivity(feats, live):
    """AZ-NAS (Lee & Ham, CVPR 2024; their compute_az_nas_score.py), on the Conv outputs: the
    entropy of the normalised eigenvalues of each layer's channel covariance over (N, H, W).
    Left out, as neither appears among the authors' block outputs: a layer with constant
    features (zero covariance; theirs: NaN, the network -inf) and a layer whose output cannot
    reach the logits (`live` false)."""
    scores = []
    for feat, alive in zip(feats, live):
        if not alive:
            continue
        b, c, h, w = feat.size()
        f = feat.permute(0, 2, 3, 1).contiguous().view(b * h * w, c)
        f = f - f.mean(dim=0, keepdim=True)
        sigma = torch.mm(f.transpose(1, 0), f) / f.size(0)
        s = torch.linalg.eigvalsh(sigma)
        if float(s.sum()) <= 0.0:
            continue
        p = s / s.sum()
        scores.append(float(((-p) * torch.log(p + 1e-8)).sum()))
    return np.array(scores)


def rademacher(seed, n):
    """SplitMix64 from `seed`, -1 where bit 63 of an output is set, else +1 (gradalign's
    autodiff::blocks::rademacher, re-implemented in numpy)."""
    k = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + k * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return np.where(z >> np.uint64(63) == 1, -1.0, 1.0)


def az_trainability(model, x):
    """AZ-NAS trainability (Lee & Ham, CVPR 2024; their compute_az_nas_score.py) on the blocks of
    their extract_cell_features: the stem and every cell and residual block. For each consecutive
    pair, g_in = autograd.grad(f_out, f_in, signs), per sample (batch of one: per-sample BN),
    pixel_unshuffle when the map shrinks, M = g_in^T g_out / (N H W), s = its largest singular
    value, -s - 1/(s + 1e-6) + 2; mean over pairs. The signs are gradalign's fixed SplitMix64 ones
    (pair k: seed 0x0A20A5 + k), theirs fresh Bernoulli draws; an identity block (g_in == signs)
    scores -1e12 where theirs is -inf."""
    mods = [model.stem] + list(model.cells)
    n = len(x)
    g_ins, shapes = None, None
    for i in range(n):
        outs = []
        hooks = [m.register_forward_hook(lambda mod, inp, out: outs.append(out)) for m in mods]
        model(torch.from_numpy(x[i:i + 1]).double())
        for h in hooks:
            h.remove()
        if shapes is None:
            shapes = [tuple(o.shape[1:]) for o in outs]
            g_ins = [[] for _ in range(len(outs) - 1)]
        for k in range(len(outs) - 1):
            co, ho, wo = shapes[k + 1]
            signs = torch.from_numpy(rademacher(0x0A20A5 + k, n * co * ho * wo).reshape(n, co, ho, wo))
            g, = torch.autograd.grad(outs[k + 1], outs[k], grad_outputs=signs[i:i + 1], retain_graph=True)
            g_ins[k].append(g.detach())
    scores = []
    for k, gs in enumerate(g_ins):
        g_in = torch.cat(gs)
        co, ho, wo = shapes[k + 1]
        g_out = torch.from_numpy(rademacher(0x0A20A5 + k, n * co * ho * wo).reshape(n, co, ho, wo))
        if g_in.shape == g_out.shape and torch.equal(g_in, g_out):
            scores.append(-1e12)
            continue
        if g_in.shape[2] != ho:
            g_in = F.pixel_unshuffle(g_in, g_in.shape[2] // ho)
        a = g_in.permute(0, 2, 3, 1).reshape(-1, g_in.shape[1])
        b = g_out.permute(0, 2, 3, 1).reshape(-1, co)
        s = float(torch.linalg.svdvals(a.T @ b / a.shape[0]).max())
        scores.append(-s - 1 / (s + 1e-6) + 2)
    model.zero_grad()
    return float(np.mean(scores))


def jacob_cov(model, x):
    rows = []
    for i in range(len(x)):
        xi = torch.from_numpy(x[i:i + 1]).double().requires_grad_(True)
        model(xi).sum().backward()
        rows.append(xi.grad.reshape(-1).numpy().copy())
    with np.errstate(invalid="ignore", divide="ignore"):
        corrs = np.corrcoef(np.stack(rows))
    if not np.isfinite(corrs).all():
        return None  # a constant Jacobian (e.g. an all-`none` network): undefined
    v = np.linalg.eigvalsh(corrs)
    k = 1e-5
    return float(-np.sum(np.log(v + k) + 1.0 / (v + k)))


def synflow(model):
    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(mod, cname, nn.Identity())
    with torch.no_grad():
        for p in m.parameters():
            p.abs_()
    m.zero_grad()
    m(torch.ones(1, 3, 32, 32, dtype=torch.float64)).sum().backward()
    return float(sum((mod.weight * mod.weight.grad).abs().sum().item() for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))))


def grasp(model, x, y, blocks):
    """zero-cost-nas GraSP with the summed per-sample loss: Hg by double backward, -Σ w ⊙ Hg."""
    ws = [m.weight for _, m, _ in blocks]
    g = [torch.zeros_like(w) for w in ws]
    for i in range(len(y)):
        loss = F.cross_entropy(model(torch.from_numpy(x[i:i + 1]).double()), torch.from_numpy(y[i:i + 1]))
        for a, b in zip(g, torch.autograd.grad(loss, ws)):
            a += b
    hg = [torch.zeros_like(w) for w in ws]
    for i in range(len(y)):
        loss = F.cross_entropy(model(torch.from_numpy(x[i:i + 1]).double()), torch.from_numpy(y[i:i + 1]))
        gf = torch.autograd.grad(loss, ws, create_graph=True)
        z = sum((a * b).sum() for a, b in zip(g, gf))
        for a, b in zip(hg, torch.autograd.grad(z, ws)):
            a += b
    return float(-sum((w.detach() * h).sum().item() for w, h in zip(ws, hg)))


def flops(model):
    macs = []
    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda mod, i, o: macs.append(o.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1])))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lambda mod, i, o: macs.append(o.numel() * mod.in_features)))
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32, dtype=torch.float64))
    for h in hooks:
        h.remove()
    return float(sum(macs))


def logit_jacobian(model, x):
    """Per sample, the Jacobian of the eval-mode logits with respect to element 0 of every named
    parameter (N x C x T), by torch.func as VKDNW's authors compute it; and the logits."""
    from torch.func import functional_call, jacrev, vmap
    m = copy.deepcopy(model).eval()
    params = {k: v.detach() for k, v in m.named_parameters()}
    buffers = {k: v.detach() for k, v in m.named_buffers()}
    first = {k: v.flatten()[0:1].clone() for k, v in params.items()}

    def one(sample):
        def pred(sub):
            full = {}
            for k, v in params.items():
                flat = v.flatten().clone()
                flat[0:1] = sub[k]
                full[k] = flat.reshape(v.shape)
            return functional_call(m, (full, buffers), (sample.unsqueeze(0),)).squeeze(0)
        return jacrev(pred)(first)

    xs = torch.from_numpy(x).double()
    jd = vmap(one)(xs)
    jac = torch.cat([torch.flatten(v, start_dim=2) for v in jd.values()], dim=2)
    with torch.no_grad():
        out = m(xs)
    return jac, out


def vkdnw(model, x):
    """VKDNW (Tybl & Neumann, CVPR 2025; ondratybl/VKDNW compute_vkdnw_score.py), written from the
    authors' code: eval-mode BatchNorm, the Jacobian of the logits with respect to element 0 of
    every named parameter, their Cholesky factor of the smoothed softmax covariance
    (alpha = 0.05, held here in float64 rather than their float16), F = mean (L J)^T (L J), the
    nine deciles of its singular values, their entropy. Returns (entropy, number of tensors)."""
    jac, out = logit_jacobian(model, x)
    alpha = 0.05
    prob = torch.softmax(out, dim=1) * (1 - alpha) + alpha / out.shape[1]
    q = torch.ones_like(prob) - torch.cumsum(prob, dim=1)
    q[:, -1] = 0.0
    q_shift = torch.roll(q, shifts=1, dims=1)
    q_shift[:, 0] = 1.0
    d = torch.sqrt(prob * q / q_shift)
    L = -torch.matmul(prob.unsqueeze(2), 1 / q.unsqueeze(2).transpose(1, 2))
    L = torch.nan_to_num(L, neginf=0.0)
    C = L.shape[1]
    eye = torch.eye(C, dtype=L.dtype).repeat(L.shape[0], 1, 1)
    L = L * (1 - eye) + eye
    L = L * (1 - torch.triu(torch.ones(C, C, dtype=L.dtype), diagonal=1).repeat(L.shape[0], 1, 1))
    L = torch.matmul(L, torch.diag_embed(d))
    a = torch.matmul(L, jac)
    fisher = torch.mean(torch.matmul(a.transpose(1, 2), a), dim=0)
    lambdas = torch.linalg.svdvals(fisher)
    quantiles = torch.quantile(lambdas, torch.arange(1, 10, dtype=lambdas.dtype) / 10)
    temp = quantiles / (quantiles.abs().sum() + 1e-10)
    entropy = float(-(temp * torch.log(temp + 1e-10)).sum())
    return entropy, jac.shape[2]


def only_trainability():
    """`--only az_trainability`: recompute that one entry of the existing scores.json."""
    x, _ = cifar_probe(N)
    path = os.path.join(ROOT, "tests", "golden", "scores.json")
    with open(path) as f:
        out = json.load(f)
    for i, (name, arch) in enumerate(FIXTURES.items()):
        out[name]["az_trainability"] = az_trainability(load_fixture(i, name, arch), x)
        print(name, out[name]["az_trainability"])
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def main():
    if sys.argv[1:] == ["--only", "az_trainability"]:
        return only_trainability()
    x, y = cifar_probe(N)
    out = {"_meta": {"n": N, "probe": "shipped CIFAR-10 probe, class-balanced", "command": "python3 tests/golden/scorers.py",
                     "torch": torch.__version__}}
    for i, (name, arch) in enumerate(FIXTURES.items()):
        model = load_fixture(i, name, arch)
        g = per_sample(model, x, y)
        blocks = weight_blocks(model)
        cols = np.concatenate([np.arange(sl.start, sl.stop) for _, _, sl in blocks])
        gw = g[:, cols]
        s = np.sign(gw)
        batch = gw.sum(0)
        wvals = np.concatenate([m.weight.detach().reshape(-1).numpy() for _, m, _ in blocks])
        wblocks = []
        off = 0
        for n, m, sl in blocks:
            wblocks.append((n, m, slice(off, off + m.weight.numel())))
            off += m.weight.numel()
        codes = relu_codes(model, x)
        feats = conv_features(model, x)
        az = az_layer_expressivity(feats, conv_reaches_logits(model, x))
        # A fresh copy: the train-mode passes above moved the BatchNorm running statistics,
        # which VKDNW's eval-mode forward reads.
        vk_entropy, vk_dim = vkdnw(load_fixture(i, name, arch), x)
        ntk = gw @ gw.T
        ev = np.linalg.eigvalsh(ntk)
        sc = {
            "gradsign": gradsign(s),
            "gradalign-i": gradalign_i_dot(gw, s, y),
            "gradalign-i-cos": gradalign_i_cos(s, y),
            "gradalign-ii": gradalign_ii(s, y, True),
            "gradalign-ii-raw": gradalign_ii(s, y, False),
            "grad_norm": float(sum(np.linalg.norm(batch[sl]) for _, _, sl in wblocks)),
            "snip": float(np.abs(wvals * batch).sum()),
            "fisher": fisher_hooks(model, x, y),
            "zico": zico(gw, wblocks),
            "ntk_cond": float(-ev[-1] / ev[0]) if ev[0] > 0 else None,
            "naswot": naswot(codes),
            "swap": swap(codes),
            "meco": meco(feats),
            "az_expressivity": float(np.sum(az)) if len(az) else None,
            "az_progressivity": float(np.min(az[1:] - az[:-1])) if len(az) > 1 else None,
            "az_trainability": az_trainability(model, x),
            "jacob_cov": jacob_cov(model, x),
            "synflow": synflow(model),
            "grasp": grasp(model, x, y, blocks),
            "params": float(sum(p.numel() for p in model.parameters())),
            "flops": flops(model),
            "vkdnw_entropy": vk_entropy,
            "vkdnw": vk_dim + vk_entropy / 3,
        }
        sc = {k: (v if v is not None and np.isfinite(v) else None) for k, v in sc.items()}
        out[name] = sc
        print(name, {k: (f"{v:.6g}" if v is not None else None) for k, v in sc.items()})
    with open(os.path.join(ROOT, "tests", "golden", "scores.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
