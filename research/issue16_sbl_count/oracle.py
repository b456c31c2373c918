"""Question 1: what the candidates contain. python oracle.py CACHE.pt"""
import sys, time, torch, numpy as np
from common import *
torch.set_num_threads(1)
d = load(*sys.argv[1:])
n = d["n_sources"]
rows = [table(d, *sbl_rule(d), "SBL rule (7 + 6 log10 P/s2)")]
rows.append(table(d, *path_stage(d, n), "true K, stage of SBL's drop path"))
lab = labels(d).bool()
keep = lab.clone(); keep[:, 0] |= keep.sum(1) == 0
rows.append(table(d, d["points"], keep, "oracle keep-matched (5 cands, no re-refine)"))
t = time.time(); p, m = refine_kept(d, keep); tr = time.time() - t
rows.append(table(d, p, m, "oracle keep-matched + re-refine"))
a, po = subset_oracle(d)
snr = d["snr"]
print(fmt(rows))
print(f"re-refine cost {tr / n.numel():.4f} s/scene")
line = "| oracle best subset of 5 cands | "
line2 = "| oracle best stage of drop path | "
line3 = "| cands cover all true (labels==K) | "
cover = (lab.sum(1) == n).numpy()
for lo, hi in BINS:
    i = ((snr >= lo) & (snr < hi)).numpy()
    line += f"{a[i].mean():.3f} | "; line2 += f"{po[i].mean():.3f} | "; line3 += f"{cover[i].mean():.3f} | "
print(line + f"{a.mean():.3f} |"); print(line2 + f"{po.mean():.3f} |"); print(line3 + f"{cover.mean():.3f} |")
# by K
for name, ok in [("SBL rule", success(d, *sbl_rule(d))), ("true K path", success(d, *path_stage(d, n))),
                 ("path oracle", po), ("subset oracle", a)]:
    print(name, "by K:", " ".join(f"{ok[(n == k).numpy()].mean():.3f}" for k in range(1, 6)))
print("front end s/scene (1 thread, shared CPU): cand", d["t_cand"].mean().item(), "path", d["t_path"].mean().item())
