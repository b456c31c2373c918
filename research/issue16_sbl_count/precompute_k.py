"""SBL candidates refined with a GIVEN count k (what sparse_bayesian_learning(n_sources=k) returns,
gamma computed once per scene and reused for every k).
python precompute_k.py SPLIT START STOP OUT MODE   MODE: 'true' (k = true K) or 'all' (k = 1..5)
Saves points (B, n_k, 5, 3) and active (B, n_k, 5) [n_k = 1 for 'true', 5 for 'all', index k-1]."""
import sys, time, torch
from pipeline import preset, Deployment, load_split, coded_dictionary, music_grid, SblSettings
from pipeline._sbl import _sbl_powers, _top_peaks, _gather_atoms, _refine, _jump, sbl_grid_config
torch.set_num_threads(1)
split, start, stop, out, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
config = preset("medium"); dep = Deployment.build(config, torch.device("cpu")); st = SblSettings()
sc = load_split(config, dep, split, stop, chunk=250).select(slice(start, stop))
gc = sbl_grid_config(config, st); grid = music_grid(gc, dep); atoms_conj, _ = coded_dictionary(gc, dep)
KM = config.max_sources
P, A, T = [], [], []
with torch.no_grad():
    for s in range(0, sc.size, 32):
        y = sc.measurements[s:s + 32].to(torch.complex64); b = y.shape[0]
        t0 = time.perf_counter()
        gamma, kept, noise0 = _sbl_powers(y, atoms_conj, grid, KM, st)
        full = gamma.new_zeros(b, atoms_conj.shape[-1]).scatter(1, kept, gamma)
        peaks = _top_peaks(full, grid.shape, KM)
        kept_points = grid.point_at(kept)
        kept_atoms = _gather_atoms(atoms_conj.conj().resolve_conj(), kept).permute(0, 3, 1, 2)
        t1 = time.perf_counter()
        ks = [sc.n_sources[s:s + 32]] if mode == "true" else [torch.full((b,), k) for k in range(1, KM + 1)]
        pp, aa = [], []
        for k in ks:
            active = torch.arange(KM)[None] < k[:, None]
            points = grid.point_at(peaks); power = full.gather(1, peaks) * active
            points, power, noise = _refine(points, power, active, noise0, y, dep, grid, st.refine_rounds)
            points, power = _jump(points, power, active, noise, y, dep, kept_points, kept_atoms)
            points, power, noise = _refine(points, power, active, noise, y, dep, grid, st.refine_rounds)
            pp.append(points); aa.append(active)
        t2 = time.perf_counter()
        P.append(torch.stack(pp, 1)); A.append(torch.stack(aa, 1))
        T.append(torch.tensor([[t1 - t0, (t2 - t1) / len(ks)]]).expand(b, 2) / b)
        torch.save({"points": torch.cat(P), "active": torch.cat(A), "t_gamma_refine": torch.cat(T)}, out)
        print(f"{split} {start + s + b}/{stop}: gamma {(t1-t0)/b:.3f} s/scene, refine per k {(t2-t1)/len(ks)/b:.3f}", flush=True)
