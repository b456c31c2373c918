"""Shared helpers: load caches, build Localizations, score by SNR bin, features, oracles."""
import itertools, math
import numpy as np
import torch
from pipeline import localization_metrics, Localization, preset
from pipeline._metrics import scene_success, matched_errors, in_success_box, _scene_success

CONFIG = preset("medium")
BINS = ((-5.0, 0.0), (0.0, 5.0), (5.0, 10.0), (10.0, 15.0), (15.0, 20.01))
K = 5


def load(*paths):
    parts = [torch.load(p) for p in paths]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def truth(d):
    mask = torch.arange(K)[None] < d["n_sources"][:, None]
    return Localization(d["az"].float(), d["el"].float(), d["rng"].float(), mask, mask.float())


def loc(points, mask):
    """points (B,5,3) az, el, 1/r; mask (B,5) bool -> Localization (slots compacted first)."""
    order = torch.argsort((~mask).int(), dim=1, stable=True)
    p = points.gather(1, order[..., None].expand(-1, -1, 3))
    m = mask.gather(1, order)
    z = torch.zeros(())
    return Localization(torch.where(m, p[..., 0], z), torch.where(m, p[..., 1], z),
                        torch.where(m, 1.0 / p[..., 2].clamp_min(1e-6), z), m, m.float())


def success(d, points, mask):
    """(B,) bool per-scene success, pipeline's definition."""
    L = loc(points, mask)
    tr = truth(d)
    return _scene_success(matched_errors(L, tr), mask.sum(-1).numpy(), tr.mask.sum(-1).numpy())


def table(d, points, mask, name):
    """Row dict: success and K accuracy by SNR bin + overall, via localization_metrics."""
    L = loc(points, mask)
    tr = truth(d)
    snr = d["snr"]
    row = {"name": name}
    m = localization_metrics(L, tr, mask.sum(-1), config=CONFIG)
    for lo, hi in BINS:
        idx = ((snr >= lo) & (snr < hi)).nonzero().squeeze(-1)
        sub = Localization(*(getattr(L, f)[idx] for f in ("azimuth_rad", "elevation_rad", "range_m", "mask", "score")))
        subt = Localization(*(getattr(tr, f)[idx] for f in ("azimuth_rad", "elevation_rad", "range_m", "mask", "score")))
        mm = localization_metrics(sub, subt, mask.sum(-1)[idx], config=CONFIG)
        row[f"s{lo:g}"] = mm["success_rate"]; row[f"k{lo:g}"] = mm["k_accuracy"]
        row[f"n{lo:g}"] = int(idx.numel())
    row["s_all"] = m["success_rate"]; row["k_all"] = m["k_accuracy"]; row["n"] = int(snr.numel())
    return row


def fmt(rows):
    lines = ["| row | -5..0 | 0..5 | 5..10 | 10..15 | 15..20 | all |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} success | " + " | ".join(f"{r[f's{lo:g}']:.3f}" for lo, _ in BINS)
                     + f" | {r['s_all']:.3f} |")
    for r in rows:
        lines.append(f"| {r['name']} K acc | " + " | ".join(f"{r[f'k{lo:g}']:.3f}" for lo, _ in BINS)
                     + f" | {r['k_all']:.3f} |")
    r = rows[0]
    lines.append("| scenes | " + " | ".join(str(r[f"n{lo:g}"]) for lo, _ in BINS) + f" | {r['n']} |")
    return "\n".join(lines)


def sbl_rule(d, threshold=7.0, slope=6.0):
    """pipeline._sbl._stop_path on the cached path: (points, mask)."""
    B = d["n_sources"].shape[0]
    pts = d["path_points"][:, 0].clone(); act = d["path_active"][:, 0].clone()
    decided = torch.zeros(B, dtype=torch.bool)
    for s in range(K):
        thr = threshold + slope * d["path_ratio"][:, s]
        a = d["path_active"][:, s]
        stop = ~decided & ((d["path_weakest"][:, s] >= thr) | (a.sum(-1) <= 1))
        pts[stop] = d["path_points"][:, s][stop]; act[stop] = a[stop]
        decided |= stop
    return pts, act


def path_stage(d, k_hat):
    """The drop-path stage with k_hat active sources (stage index 5 - k_hat)."""
    s = (K - k_hat).clamp(0, K - 1)
    ar = torch.arange(k_hat.shape[0])
    return d["path_points"][ar, s], d["path_active"][ar, s]


def subset_oracle(d):
    """Best of all 31 non-empty subsets of the 5 initial candidates: (B,) bool success, and
    success with the path stages (oracle count on SBL's own drop order)."""
    B = d["n_sources"].shape[0]
    any_ok = np.zeros(B, bool)
    for r in range(1, K + 1):
        for sub in itertools.combinations(range(K), r):
            m = torch.zeros(B, K, dtype=torch.bool); m[:, list(sub)] = True
            any_ok |= success(d, d["points"], m)
    path_ok = np.zeros(B, bool)
    for s in range(K):
        path_ok |= success(d, d["path_points"][:, s], d["path_active"][:, s])
    return any_ok, path_ok


def labels(d):
    """(B,5) float: candidate matched (Hungarian vs truth, all 5 kept) inside the success box."""
    L = loc(d["points"], torch.ones_like(d["power"], dtype=torch.bool))
    e = matched_errors(L, truth(d))
    inside = in_success_box(e)
    lab = torch.zeros(d["power"].shape)
    lab[torch.as_tensor(e["scene"][inside]), torch.as_tensor(e["est_slot"][inside])] = 1.0
    return lab


STEP = torch.tensor([math.radians(3.0), math.radians(3.0), 1.0])  # az, el, (1/r scaled later)


def features(d):
    """Per-candidate features (B,5,F) and global features (B,G)."""
    B = d["power"].shape[0]
    pts = d["points"]
    ratio0 = d["path_ratio"][:, 0]  # log10(P / sigma^2), front-end estimate
    thr = 7.0 + 6.0 * d["path_ratio"]  # SBL's threshold at each stage (B,5)
    gain = d["gain"].clamp_min(0)
    # drop stage of each candidate: number of stages in which it is active (1..5)
    alive = d["path_active"].float().sum(1)  # (B,5)
    # the weakest gain at the stage where it was dropped (or the last stage's for the survivor)
    st = (alive - 1).long().clamp(0, K - 1)
    drop_gain = d["path_weakest"].gather(1, st)
    drop_thr = thr.gather(1, st)
    # power share (as sparse_bayesian_learning's score, up to the atom energy ~ use power)
    P = d["y"].abs().square().mean((1, 2))
    share = d["power"] / P[:, None]
    rank_gain = gain.argsort(1, descending=True).argsort(1).float()
    # distance to the nearest other candidate, in grid steps (1/r grid spacing ~ range of u / 5)
    uspan = (pts[..., 2].amax() - pts[..., 2].amin()).clamp_min(1e-3) / 5
    sc = torch.tensor([math.radians(3.0), math.radians(3.0), float(uspan)])
    diff = (pts[:, :, None, :] - pts[:, None, :, :]) / sc
    dist = diff.norm(dim=-1) + torch.eye(K) * 1e3
    nn = dist.min(-1).values.clamp_max(20.0)
    tg = d["top_gamma"].clamp_min(1e-20)
    lg_top = torch.log10(tg / tg[:, :1])  # (B,10) relative peak profile of gamma
    # gamma at each candidate's (pre-refinement) grid peak, relative to the strongest
    lg_cand = lg_top[:, :K]
    cand = torch.stack([
        torch.log1p(gain), (gain - thr[:, :1]) / 10.0, torch.log10(share.clamp_min(1e-6)),
        rank_gain / 4.0, (alive - 1) / 4.0, torch.log1p(drop_gain.clamp_min(0)),
        (drop_gain - drop_thr) / 10.0, pts[..., 0] / 1.05, pts[..., 1] / 0.52,
        pts[..., 2] / 2.0, lg_cand, torch.log1p(nn),
    ], dim=-1)
    glob = torch.cat([
        ratio0[:, None], d["path_ratio"], torch.log1p(d["path_weakest"].clamp_min(0)),
        (d["path_weakest"] - thr) / 10.0, lg_top.clamp_min(-6) / 6.0,
        torch.log10(d["noise_sbl"] / P)[:, None] / 3.0,
    ], dim=-1)
    return cand.float(), glob.float()


_DEP = {}


def refine_kept(d, keep, rounds=8, chunk=64):
    """Drop the non-kept candidates at once, then refine the kept ones on the likelihood (as
    pipeline._sbl._count does after each drop). Returns (points, keep). Costs SBL refinement."""
    from pipeline import Deployment, music_grid, SblSettings
    from pipeline._sbl import _refine, sbl_grid_config
    if not _DEP:
        dep = Deployment.build(CONFIG, torch.device("cpu"))
        _DEP["dep"] = dep
        _DEP["grid"] = music_grid(sbl_grid_config(CONFIG, SblSettings()), dep)
    dep, grid = _DEP["dep"], _DEP["grid"]
    out = []
    with torch.no_grad():
        for s in range(0, keep.shape[0], chunk):
            sl = slice(s, s + chunk)
            a = keep[sl]
            p, _, _ = _refine(d["points"][sl].clone(), d["power"][sl] * a, a, d["noise"][sl],
                              d["y"][sl], dep, grid, rounds)
            out.append(p)
    return torch.cat(out), keep
