"""Does a larger candidate pool raise the oracle ceiling? python more_cands.py N_SCENES KMAX...
Runs SBL + refinement + jump with k_max candidates on the first N val_eval scenes (val 500..)
and scores the keep-matched oracle (with and without re-refinement of the kept set)."""
import sys, time, torch, numpy as np
from pipeline import preset, Deployment, load_split, coded_dictionary, music_grid, SblSettings, Localization
from pipeline._sbl import _candidates, _refine, sbl_grid_config
from pipeline._metrics import matched_errors, in_success_box, _scene_success
from common import BINS, CONFIG
torch.set_num_threads(1)
n = int(sys.argv[1])
config = CONFIG
dep = Deployment.build(config, torch.device("cpu"))
st = SblSettings()
sc = load_split(config, dep, "val", 500 + n, chunk=250).select(slice(500, 500 + n))
gc = sbl_grid_config(config, st); grid = music_grid(gc, dep); atoms_conj, _ = coded_dictionary(gc, dep)
tmask = sc.source_mask.bool()
truth = Localization(sc.azimuth_rad, sc.elevation_rad, sc.range_m, tmask, tmask.float())
nt = sc.n_sources.numpy()


def as_loc(p, m):
    z = torch.zeros(())
    return Localization(torch.where(m, p[..., 0], z), torch.where(m, p[..., 1], z),
                        torch.where(m, 1 / p[..., 2].clamp_min(1e-6), z), m, m.float())


def by_bin(ok):
    s = sc.snr_db
    return " | ".join(f"{ok[((s >= lo) & (s < hi)).numpy()].mean():.3f}" for lo, hi in BINS) + f" | {ok.mean():.3f}"


for kmax in map(int, sys.argv[2:]):
    t0 = time.perf_counter()
    pts, pw, nz = [], [], []
    with torch.no_grad():
        for s in range(0, n, 32):
            y = sc.measurements[s:s + 32].to(torch.complex64)
            state = _candidates(y, None, dep, grid, atoms_conj, kmax, st)
            pts.append(state.points); pw.append(state.power); nz.append(state.noise)
    t = (time.perf_counter() - t0) / n
    pts, pw, nz = torch.cat(pts), torch.cat(pw), torch.cat(nz)
    allm = torch.ones(n, kmax, dtype=torch.bool)
    e = matched_errors(as_loc(pts, allm), truth)
    ins = in_success_box(e)
    keep = torch.zeros(n, kmax, dtype=torch.bool)
    keep[torch.as_tensor(e["scene"][ins]), torch.as_tensor(e["est_slot"][ins])] = True
    keep[:, 0] |= keep.sum(1) == 0
    ok = _scene_success(matched_errors(as_loc(pts, keep), truth), keep.sum(1).numpy(), nt)
    rp = []
    with torch.no_grad():
        for s in range(0, n, 64):
            sl = slice(s, s + 64)
            p, _, _ = _refine(pts[sl].clone(), pw[sl] * keep[sl], keep[sl], nz[sl],
                              sc.measurements[sl].to(torch.complex64), dep, grid, 8)
            rp.append(p)
    rp = torch.cat(rp)
    ok2 = _scene_success(matched_errors(as_loc(rp, keep), truth), keep.sum(1).numpy(), nt)
    print(f"k_max {kmax}: {t:.3f} s/scene; oracle keep-matched: {by_bin(ok)}; + re-refine: {by_bin(ok2)}", flush=True)
    print("   by K:", " ".join(f"{ok[nt == k].mean():.3f}" for k in range(1, 6)), flush=True)
