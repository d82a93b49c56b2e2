"""Record every method's predictions on a tiny entry before the methods move (issue 18)."""
import sys, shutil, json
from pathlib import Path
import torch
torch.set_num_threads(1)
from cryopose import io
from cryopose.simulate import SimulationSpec, simulate_entry
from cryopose.methods import get_method
from cryopose.evaluate import ground_truth_maps
from cryopose.matching import RefineConfig, refine_entry
from cryopose.relion_refine import RelionRefineConfig, auto_refine_command, blind_particles

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
work = Path("/tmp/rec/work"); shutil.rmtree(work, ignore_errors=True); work.mkdir()
spec = SimulationSpec(name="recorded", symmetry="C2", box_size=32, pixel_size=4.1, n_particles=60, snr=1.0, seed=4)
entry = io.Entry(simulate_entry(spec, work / "b", progress=False))
params = {
  "ground_truth": {}, "random": {"seed": 3},
  "image2sphere": {"image_size": 32, "sphere_channels": 16, "lmax": 3, "s2_channels": 4, "s2_kernel_order": 1,
     "activation_resolution": 4, "so3_kernel_n_alpha": 4, "so3_kernel_n_beta": 2, "output_order": 1,
     "batch_size": 16, "max_epochs": 1, "device": "cpu", "refine_steps": 1},
  "projection_matching": {"coarse_order": 1, "candidates": 2, "rounds": 2, "device": "cpu"} ,
}
for name, p in params.items():
    m = get_method(name)
    full = {**m.default_params, **{k: v for k, v in p.items() if k in m.default_params}}
    m.train(entry, 0, work / f"{name}_m0", full)
    m.predict(work / f"{name}_m0", entry, 1, out / f"{name}.star", full)
    print(name, "done", flush=True)
gt0, gt1, px = ground_truth_maps(entry, work / "gt", progress=False)
refine_entry(entry, 1, out / "random.star", work / "gt" / "GT_half0.mrc", out / "random+refine.star",
             RefineConfig(local_rounds=2, local_device="cpu"), progress=False)
cfg = RelionRefineConfig(ini_high_A=20.0)
blind = work / "blind.star"
blind_particles(entry, 1, blind)
b = io.read_particles_star(blind)
b.particles.drop(columns=["rlnImageName"]).to_csv(out / "relion_refine.blind.csv", index=False)
cmd = auto_refine_command(cfg, "start.star", "reference.mrc", "run/run", "C2", 131.2)
(out / "relion_refine.command.json").write_text(json.dumps(cmd if isinstance(cmd, list) else str(cmd)) + "\n")
print(json.dumps(params), file=open(out / "params.json", "w"))
