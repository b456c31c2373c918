"""(a) SBL run with the TRUE K from the start (sparse_bayesian_learning(n_sources=K)) on the eval
scenes, vs the true-K stage of the drop path; (b) near misses: failing true-K scenes whose every
true source is matched within 2x / 1.5x the success box (what a small learned position correction
could at most recover). python diag.py val_eval.pt"""
import sys, time, torch, numpy as np
from pipeline import Deployment, sparse_bayesian_learning, load_split
from pipeline._metrics import matched_errors
from common import *
torch.set_num_threads(1)
d = load(sys.argv[1])
n = d["n_sources"]; B = n.numel(); snr = d["snr"]
dep = Deployment.build(CONFIG, torch.device("cpu"))
t = time.perf_counter()
found = sparse_bayesian_learning(d["y"], dep, CONFIG, n_sources=n)
tt = (time.perf_counter() - t) / B
r = table(d, torch.stack([found.azimuth_rad, found.elevation_rad, 1 / found.range_m.clamp_min(1e-6)], -1), found.mask, f"SBL true K from scratch ({tt:.3f} s/scene)")
r2 = table(d, *path_stage(d, n), "true K, drop-path stage")
print(fmt([r, r2]))
pts, m = path_stage(d, n)
L = loc(pts, m); e = matched_errors(L, truth(d))
ok = success(d, pts, m)
for f in (1.5, 2.0):
    inside = (e["azimuth_deg"] <= 3 * f) & (e["elevation_deg"] <= 3 * f) & (e["range_m"] <= 0.5 * f)
    cnt = np.bincount(e["scene"][inside], minlength=B)
    near = (cnt == n.numpy()) & ~ok
    print(f"true-K failures with every source within {f}x box: {near.sum()} of {(~ok).sum()} failures;"
          " by bin " + " ".join(f"{near[((snr >= lo) & (snr < hi)).numpy()].mean():.3f}" for lo, hi in BINS)
          + f"; all {near.mean():.3f}")
