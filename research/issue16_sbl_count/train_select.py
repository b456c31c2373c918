"""Learned keep/drop selector over SBL's candidates, and a learned count head, vs SBL's rule.

python train_select.py --train train_a.pt [train_b.pt] --tune val_tune.pt --eval val_eval.pt
"""
import argparse, time, json
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from common import *

torch.set_num_threads(1)
ap = argparse.ArgumentParser()
ap.add_argument("--train", nargs="+", required=True)
ap.add_argument("--tune", required=True)
ap.add_argument("--eval", required=True)
ap.add_argument("--n-train", type=int, default=0)
ap.add_argument("--hidden", type=int, default=32)
ap.add_argument("--steps", type=int, default=2000)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", default=None)
args = ap.parse_args()
torch.manual_seed(args.seed)

tr, tu, ev = load(*args.train), load(args.tune), load(args.eval)
if args.n_train:
    tr = {k: v[:args.n_train] for k, v in tr.items()}
n_tr = tr["n_sources"].shape[0]


class SetSelector(nn.Module):
    """DeepSets: candidate token -> embedding; [token emb, mean and max of embs, global] -> keep
    logit per candidate; also count logits (5) from the pooled embedding + global."""

    def __init__(self, fc, fg, h):
        super().__init__()
        self.emb = nn.Sequential(nn.Linear(fc, h), nn.GELU(), nn.Linear(h, h), nn.GELU())
        self.glob = nn.Sequential(nn.Linear(fg, h), nn.GELU())
        self.keep = nn.Sequential(nn.Linear(4 * h, h), nn.GELU(), nn.Linear(h, 1))
        self.count = nn.Sequential(nn.Linear(3 * h, h), nn.GELU(), nn.Linear(h, K))
        self.stage = nn.Sequential(nn.Linear(3 * h, h), nn.GELU(), nn.Linear(h, K))

    def forward(self, c, g):
        e = self.emb(c)
        pooled = torch.cat([e.mean(1), e.amax(1)], -1)
        gg = self.glob(g)
        ctx = torch.cat([pooled, gg], -1)
        keep = self.keep(torch.cat([e, ctx[:, None].expand(-1, K, -1)], -1)).squeeze(-1)
        return keep, self.count(ctx), self.stage(ctx)


def prep(d):
    c, g = features(d)
    # stage s of the drop path (5 - s sources) is a success: K = 5 - s and all in the box
    st = torch.stack([torch.as_tensor(success(d, d["path_points"][:, s], d["path_active"][:, s]))
                      for s in range(K)], 1).float()
    return c, g, labels(d), d["n_sources"] - 1, st


c_tr, g_tr, y_tr, k_tr, s_tr = prep(tr)
c_tu, g_tu, y_tu, k_tu, s_tu = prep(tu)
c_ev, g_ev, y_ev, k_ev, s_ev = prep(ev)
mu_c, sd_c = c_tr.flatten(0, 1).mean(0), c_tr.flatten(0, 1).std(0) + 1e-3
mu_g, sd_g = g_tr.mean(0), g_tr.std(0) + 1e-3
nc = lambda c: (c - mu_c) / sd_c
ng = lambda g: (g - mu_g) / sd_g

model = SetSelector(c_tr.shape[-1], g_tr.shape[-1], args.hidden)
n_params = sum(p.numel() for p in model.parameters())
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
t0 = time.perf_counter()
best, best_state = 1e9, None
BS = 256
for step in range(args.steps):
    idx = torch.randint(0, n_tr, (BS,))
    keep, count, stage = model(nc(c_tr[idx]), ng(g_tr[idx]))
    loss = (F.binary_cross_entropy_with_logits(keep, y_tr[idx]) + F.cross_entropy(count, k_tr[idx])
            + F.binary_cross_entropy_with_logits(stage, s_tr[idx]))
    opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    if step % 100 == 99 or step == args.steps - 1:
        with torch.no_grad():
            kv, cv, sv = model(nc(c_tu), ng(g_tu))
            vl = (F.binary_cross_entropy_with_logits(kv, y_tu) + F.cross_entropy(cv, k_tu)
                  + F.binary_cross_entropy_with_logits(sv, s_tu)).item()
        if vl < best:
            best, best_state = vl, {k: v.clone() for k, v in model.state_dict().items()}
train_s = time.perf_counter() - t0
model.load_state_dict(best_state)
print(f"train scenes {n_tr}, params {n_params}, train wall {train_s:.1f} s, best tune loss {best:.4f}")


def decide(d, c, g, thr, how):
    with torch.no_grad():
        kv, cv, sv = model(nc(c), ng(g))
    prob = torch.sigmoid(kv)
    keep = prob > thr
    top = prob.argmax(1)
    keep[torch.arange(keep.shape[0]), top] |= keep.sum(1) == 0  # at least one source
    if how == "keep":  # kept candidates' positions (from the 5-candidate refinement)
        return d["points"], keep
    if how == "keep->path":  # K-hat = number kept; positions from SBL's drop path at K-hat
        return path_stage(d, keep.sum(1))
    if how == "count->path":  # count head argmax -> path stage
        return path_stage(d, cv.argmax(1) + 1)
    if how.startswith("blend"):  # argmax_k sigmoid(stage_k) + lam * P(K = k)
        lam = float(how.split()[1])
        score = torch.sigmoid(sv) + lam * torch.softmax(cv, 1).flip(1)  # stage s <-> K = 5 - s
        return path_stage(d, K - score.argmax(1))
    if how == "stage->path":  # stage head: the drop-path stage most likely to be a success
        return path_stage(d, K - sv.argmax(1))
    raise ValueError(how)


# threshold on the tune scenes only
chosen = {}
for how in ("keep", "keep->path"):
    scores = []
    for thr in np.arange(0.1, 0.91, 0.05):
        s = success(tu, *decide(tu, c_tu, g_tu, thr, how)).mean()
        scores.append((s, thr))
    chosen[how] = max(scores)[1]
    print(how, "tune success by threshold:", " ".join(f"{t:.2f}:{s:.3f}" for s, t in scores))
tune_rows = [table(tu, *sbl_rule(tu), "SBL rule")]
for how in ("keep", "keep->path"):
    tune_rows.append(table(tu, *decide(tu, c_tu, g_tu, chosen[how], how), f"learned {how}"))
tune_rows.append(table(tu, *decide(tu, c_tu, g_tu, 0.5, "count->path"), "learned count->path"))
tune_rows.append(table(tu, *decide(tu, c_tu, g_tu, 0.5, "stage->path"), "learned stage->path"))
print("TUNE scenes (threshold chosen here):"); print(fmt(tune_rows))

blend_scores = []
for lam in (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0):
    t = table(tu, *decide(tu, c_tu, g_tu, 0, f"blend {lam}"), "")
    blend_scores.append((t["s_all"], t["k_all"], lam))
print("blend lam on tune (success, K acc):", " ".join(f"{l}:{s:.3f}/{k:.3f}" for s, k, l in blend_scores))
base_k = table(tu, *sbl_rule(tu), "")["k_all"]
ok = [b for b in blend_scores if b[1] >= base_k] or blend_scores
lam_star = max(ok)[2]
print("chosen lam (max tune success with tune K acc >= SBL rule's):", lam_star)
rows = [table(ev, *sbl_rule(ev), "SBL rule")]
for how in ("keep", "keep->path"):
    rows.append(table(ev, *decide(ev, c_ev, g_ev, chosen[how], how), f"learned {how} (thr {chosen[how]:.2f})"))
rows.append(table(ev, *decide(ev, c_ev, g_ev, 0.5, "count->path"), "learned count->path"))
rows.append(table(ev, *decide(ev, c_ev, g_ev, 0.5, "stage->path"), "learned stage->path"))
rows.append(table(ev, *decide(ev, c_ev, g_ev, 0, f"blend {lam_star}"), f"learned blend lam={lam_star}"))
rows.append(table(ev, *path_stage(ev, ev["n_sources"]), "true K on path"))
from scipy.stats import binomtest
base = success(ev, *sbl_rule(ev))
for how in ("count->path", "stage->path", f"blend {lam_star}"):
    other = success(ev, *decide(ev, c_ev, g_ev, 0.5, how))
    b, c = int((other & ~base).sum()), int((base & ~other).sum())
    p = binomtest(b, b + c).pvalue if b + c else 1.0
    print(f"McNemar {how} vs SBL rule: only learned {b}, only SBL {c}, p = {p:.3g}")
print("EVAL scenes:"); print(fmt(rows))
if args.out:
    json.dump({"n_train": n_tr, "params": n_params, "train_s": train_s, "chosen": chosen,
               "rows": rows, "tune_rows": tune_rows}, open(args.out, "w"), indent=1)
