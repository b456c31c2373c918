"""Precompute coded-SBL candidates + full drop path for medium scenes; cache to /tmp/research.

python precompute.py SPLIT START STOP OUT   (split in train/val; scene indices [START, STOP) of
load_split(config, dep, SPLIT, STOP, chunk=250))
One thread. Saves a dict of per-scene tensors after every chunk (resumable by rerunning).
"""
import sys, time, math
import torch
import pipeline
from pipeline import preset, Deployment, load_split, coded_dictionary, music_grid, SblSettings
from pipeline._sbl import (_sbl_powers, _top_peaks, _gather_atoms, _refine, _jump, _count,
                           _source_gains, sbl_grid_config, _State)
from pipeline._pursuit import _coded_atoms
from pipeline._linalg import squared_magnitude

torch.set_num_threads(1)
split, start, stop, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
CHUNK = 32
config = preset("medium")
dep = Deployment.build(config, torch.device("cpu"))
settings = SblSettings()
scenes = load_split(config, dep, split, stop, chunk=250).select(slice(start, stop))
gconf = sbl_grid_config(config, settings)
grid = music_grid(gconf, dep)
atoms_conj, _ = coded_dictionary(gconf, dep)
k_max = config.max_sources
N_TOP = 10


def candidates(y):
    """Copy of pipeline._sbl._candidates (n_sources=None) that also returns gamma features."""
    n_batch = y.shape[0]
    gamma, kept, noise0 = _sbl_powers(y, atoms_conj, grid, k_max, settings)
    n_grid = atoms_conj.shape[-1]
    full = gamma.new_zeros(n_batch, n_grid).scatter(1, kept, gamma)
    top = _top_peaks(full, grid.shape, N_TOP)  # strongest N_TOP local maxima
    top_gamma = full.gather(1, top)
    peaks = top[:, :k_max]
    points = grid.point_at(peaks)
    power = full.gather(1, peaks)
    grid_points = points.clone()
    active = torch.ones(n_batch, k_max, dtype=torch.bool)
    kept_points = grid.point_at(kept)
    dictionary = atoms_conj.conj().resolve_conj()
    kept_atoms = _gather_atoms(dictionary, kept).permute(0, 3, 1, 2)
    r = settings.refine_rounds
    noise = noise0
    points, power, noise = _refine(points, power, active, noise, y, dep, grid, r)
    points, power = _jump(points, power, active, noise, y, dep, kept_points, kept_atoms)
    points, power, noise = _refine(points, power, active, noise, y, dep, grid, r)
    extra = dict(top_gamma=top_gamma, gamma_sum=full.sum(-1), noise_sbl=noise0,
                 grid_points=grid_points)
    return _State(points, power * active, active, noise), extra


res = {k: [] for k in ["points", "power", "noise", "gain", "top_gamma", "gamma_sum", "noise_sbl",
                       "grid_points", "path_points", "path_power", "path_active", "path_noise",
                       "path_weakest", "path_ratio", "y", "n_sources", "az", "el", "rng", "snr",
                       "true_power", "t_cand", "t_path"]}
with torch.no_grad():
    for s in range(0, scenes.size, CHUNK):
        b = scenes.select(slice(s, s + CHUNK))
        y = b.measurements.to(torch.complex64)
        t0 = time.perf_counter()
        state, extra = candidates(y)
        t1 = time.perf_counter()
        gain = _source_gains(state.points, state.power, state.active, state.noise, y, dep)
        path = []
        _count(state, y, dep, grid, settings, path=path)
        t2 = time.perf_counter()
        while len(path) < k_max:  # pad (all scenes reached 1 source)
            path.append(path[-1])
        res["points"].append(state.points); res["power"].append(state.power)
        res["noise"].append(state.noise); res["gain"].append(gain)
        for k, v in extra.items():
            res[k].append(v)
        res["path_points"].append(torch.stack([p[0].points for p in path], 1))
        res["path_power"].append(torch.stack([p[0].power for p in path], 1))
        res["path_active"].append(torch.stack([p[0].active for p in path], 1))
        res["path_noise"].append(torch.stack([p[0].noise for p in path], 1))
        res["path_weakest"].append(torch.stack([p[1] for p in path], 1))
        res["path_ratio"].append(torch.stack([p[2] for p in path], 1))
        res["y"].append(y); res["n_sources"].append(b.n_sources)
        res["az"].append(b.azimuth_rad); res["el"].append(b.elevation_rad)
        res["rng"].append(b.range_m); res["snr"].append(b.snr_db); res["true_power"].append(b.power)
        n = y.shape[0]
        res["t_cand"].append(torch.full((n,), (t1 - t0) / n))
        res["t_path"].append(torch.full((n,), (t2 - t1) / n))
        torch.save({k: torch.cat(v) for k, v in res.items()}, out)
        print(f"{split} {start + s + n}/{stop}: cand {(t1-t0)/n:.3f} s/scene, path {(t2-t1)/n:.3f}",
              flush=True)
