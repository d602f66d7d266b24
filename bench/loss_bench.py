"""The owner's loss (chunked cross-entropy over a frozen output head, common/train/cross_entropy.cpp),
forward + backward, the two ways it has been computed, written with the same ATen operations:
"recompute" forms each chunk's logits again in the backward (a trained head's way); "in forward"
forms (softmax - one-hot)·W while the logits are at hand and the backward only scales the rows.
Shapes of the 1b anchor's head (H 2048, vocabulary 100352), 1024 tokens, fp32, 2 threads; best of 3,
alternated. Usage: .venv/bin/python3 bench/loss_bench.py"""
import time, torch
torch.set_num_threads(2); torch.manual_seed(0)
n, h, v, chunk = 1024, 2048, 100352, 334
W = torch.randn(v, h) * 0.02; x = torch.randn(n, h); t = torch.randint(0, v, (n,)); g = torch.full((n,), 1.0 / n)
def recompute():
    lse = torch.empty(n); nll = torch.empty(n)
    for s in range(0, n, chunk):
        r = min(chunk, n - s); lg = (x[s:s+r] @ W.t()); l = torch.logsumexp(lg, 1); lse[s:s+r] = l; nll[s:s+r] = l - lg.gather(1, t[s:s+r, None])[:, 0]
    gh = torch.empty(n, h)
    for s in range(0, n, chunk):
        r = min(chunk, n - s); d = (x[s:s+r] @ W.t()).sub_(lse[s:s+r, None]).exp_()
        d.scatter_add_(1, t[s:s+r, None], torch.full((r, 1), -1.0)); d.mul_(g[s:s+r, None]); gh[s:s+r] = d @ W
    return nll, gh
def in_forward():
    nll = torch.empty(n); G = torch.empty(n, h)
    for s in range(0, n, chunk):
        r = min(chunk, n - s); lg = (x[s:s+r] @ W.t()); l = torch.logsumexp(lg, 1); nll[s:s+r] = l - lg.gather(1, t[s:s+r, None])[:, 0]
        lg.sub_(l[:, None]).exp_(); lg.scatter_add_(1, t[s:s+r, None], torch.full((r, 1), -1.0)); torch.mm(lg, W, out=G[s:s+r])
    return nll, G * g[:, None]
a, b = recompute(), in_forward()
print("largest difference: nll", (a[0]-b[0]).abs().max().item(), "grad", ((a[1]-b[1]).abs().max() / a[1].abs().max()).item())
best = {}
for rnd in range(3):
    for name, f in (("recompute", recompute), ("in forward", in_forward)):
        s = time.perf_counter(); f(); e = time.perf_counter() - s
        best[name] = min(best.get(name, 1e9), e)
print({k: round(v_, 3) for k, v_ in best.items()}, "recompute / in forward: %.2fx" % (best["recompute"] / best["in forward"]))
