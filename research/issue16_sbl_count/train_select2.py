"""Count-then-rerun: the network decides K-hat from the 5-candidate front end (+ its drop path);
the positions are SBL's candidates refined with K-hat active (precompute_k.py caches, k = 1..5).

python train_select2.py --train train_a.pt train_b.pt --ktrain k_train.pt --tune val_tune.pt
       --ktune k_val_tune.pt --eval val_eval.pt --keval k_val_eval.pt [--hidden 16 --seed 0]
Heads: count (CE on true K); 'rerun-stage' (5 logits, BCE on onehot(K) * [SBL with true K succeeds]);
blend = argmax_k sigmoid(stage_k) + lam P(K = k), lam tuned on the tune scenes.
"""
import argparse, time, json
import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F
from scipy.stats import binomtest
from common import *

torch.set_num_threads(1)
ap = argparse.ArgumentParser()
for a in ("train", "ktrain"):
    ap.add_argument("--" + a, nargs="+", required=True)
for a in ("tune", "ktune"):
    ap.add_argument("--" + a, required=True)
for a in ("eval", "keval"):
    ap.add_argument("--" + a, nargs="+", required=True)
ap.add_argument("--n-train", type=int, default=0)
ap.add_argument("--hidden", type=int, default=16)
ap.add_argument("--steps", type=int, default=4000)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", default=None)
ap.add_argument("--ensemble", type=int, default=1)
args = ap.parse_args()
torch.manual_seed(args.seed)
tr, tu, ev = load(*args.train), load(args.tune), load(*args.eval)
ktr = load(*args.ktrain)
ktu, kev = torch.load(args.ktune), load(*args.keval)
n_all = min(tr["n_sources"].shape[0], ktr["points"].shape[0])
n_tr = args.n_train or n_all
tr = {k: v[:n_tr] for k, v in tr.items()}; ktr = {k: v[:n_tr] for k, v in ktr.items()}


def rerun(d, kd, k_hat):
    """Positions of SBL refined with k_hat active (kd from precompute_k 'all')."""
    ar = torch.arange(k_hat.shape[0]); i = (k_hat - 1).clamp(0, K - 1)
    return kd["points"][ar, i], kd["active"][ar, i]


class Net(nn.Module):
    def __init__(self, fc, fg, h):
        super().__init__()
        self.emb = nn.Sequential(nn.Linear(fc, h), nn.GELU(), nn.Linear(h, h), nn.GELU())
        self.glob = nn.Sequential(nn.Linear(fg, h), nn.GELU())
        self.count = nn.Sequential(nn.Linear(3 * h, h), nn.GELU(), nn.Linear(h, K))
        self.stage = nn.Sequential(nn.Linear(3 * h, h), nn.GELU(), nn.Linear(h, K))

    def forward(self, c, g):
        e = self.emb(c)
        ctx = torch.cat([e.mean(1), e.amax(1), self.glob(g)], -1)
        return self.count(ctx), self.stage(ctx)  # index k-1 <-> K = k


c_tr, g_tr = features(tr); c_tu, g_tu = features(tu); c_ev, g_ev = features(ev)
k_tr, k_tu = tr["n_sources"] - 1, tu["n_sources"] - 1
ok_tr = torch.as_tensor(success(tr, ktr["points"][:, 0], ktr["active"][:, 0])).float()
s_tr = F.one_hot(k_tr, K).float() * ok_tr[:, None]
ok_tu = torch.as_tensor(success(tu, *rerun(tu, ktu, tu["n_sources"]))).float()
s_tu = F.one_hot(k_tu, K).float() * ok_tu[:, None]
mu_c, sd_c = c_tr.flatten(0, 1).mean(0), c_tr.flatten(0, 1).std(0) + 1e-3
mu_g, sd_g = g_tr.mean(0), g_tr.std(0) + 1e-3
nc = lambda c: (c - mu_c) / sd_c
ng = lambda g: (g - mu_g) / sd_g
models, train_s = [], 0.0
for member in range(args.ensemble):
    torch.manual_seed(args.seed + member)
    model = Net(c_tr.shape[-1], g_tr.shape[-1], args.hidden)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    t0 = time.perf_counter(); best, best_state = 1e9, None
    for step in range(args.steps):
        idx = torch.randint(0, n_tr, (256,))
        cv, sv = model(nc(c_tr[idx]), ng(g_tr[idx]))
        loss = F.cross_entropy(cv, k_tr[idx]) + F.binary_cross_entropy_with_logits(sv, s_tr[idx])
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        if step % 100 == 99:
            with torch.no_grad():
                cv, sv = model(nc(c_tu), ng(g_tu))
                vl = (F.cross_entropy(cv, k_tu) + F.binary_cross_entropy_with_logits(sv, s_tu)).item()
            if vl < best:
                best, best_state = vl, {k: v.clone() for k, v in model.state_dict().items()}
    train_s += time.perf_counter() - t0
    model.load_state_dict(best_state)
    models.append(model)
print(f"ensemble {args.ensemble}, train scenes {n_tr}, params {n_params} each, train wall {train_s:.1f} s, best tune loss {best:.4f}")


def k_hat(c, g, how):
    with torch.no_grad():
        outs = [m(nc(c), ng(g)) for m in models]
    pc = torch.stack([torch.softmax(o[0], 1) for o in outs]).mean(0)
    ps = torch.stack([torch.sigmoid(o[1]) for o in outs]).mean(0)
    if how == "count":
        return pc.argmax(1) + 1
    if how == "stage":
        return ps.argmax(1) + 1
    lam = float(how.split()[1])
    return (ps + lam * pc).argmax(1) + 1


blend = []
for lam in (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0):
    t = table(tu, *rerun(tu, ktu, k_hat(c_tu, g_tu, f"blend {lam}")), "")
    blend.append((t["s_all"], t["k_all"], lam))
print("blend lam on tune (success/K acc):", " ".join(f"{l}:{s:.3f}/{k:.3f}" for s, k, l in blend))
base_k = table(tu, *sbl_rule(tu), "")["k_all"]
lam_star = max([b for b in blend if b[1] >= base_k] or blend)[2]
print("chosen lam:", lam_star)

sbl_k = sbl_rule(ev)[1].sum(1)
rows = [table(ev, *sbl_rule(ev), "SBL rule (as shipped)"),
        table(ev, *rerun(ev, kev, sbl_k), "SBL rule K, rerun with K-hat")]
decisions = {"count": k_hat(c_ev, g_ev, "count"), "stage": k_hat(c_ev, g_ev, "stage"),
             f"blend {lam_star}": k_hat(c_ev, g_ev, f"blend {lam_star}")}
for name, kh in decisions.items():
    rows.append(table(ev, *rerun(ev, kev, kh), f"learned {name}, rerun"))
rows.append(table(ev, *rerun(ev, kev, ev["n_sources"]), "true K, rerun (ceiling)"))
print("EVAL scenes:"); print(fmt(rows))
base = success(ev, *sbl_rule(ev))
for name, kh in [("SBL rule K rerun", sbl_k)] + list(decisions.items()):
    other = success(ev, *rerun(ev, kev, kh))
    b, c = int((other & ~base).sum()), int((base & ~other).sum())
    print(f"McNemar {name} vs SBL rule: only this {b}, only SBL {c}, p = {binomtest(b, b + c).pvalue if b + c else 1:.3g}")
print("DIAGNOSTIC ONLY (eval-side frontier, not used for any choice): lam -> eval success / K acc by bin")
for lam in (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0):
    t = table(ev, *rerun(ev, kev, k_hat(c_ev, g_ev, f"blend {lam}")), "")
    print(f"  lam {lam}: success {t['s_all']:.3f}, K acc {t['k_all']:.3f} by bin "
          + " ".join(f"{t[f'k{lo:g}']:.3f}" for lo, _ in BINS))
if args.out:
    json.dump({"n_train": n_tr, "params": n_params, "train_s": train_s, "lam": lam_star, "rows": rows},
              open(args.out, "w"), indent=1)
