"""Per-matrix cost at Llama-3-8B shapes (random Gaussian matrices), extrapolated to the 224 decoder matrices.

    python3 bench/bench_shapes.py --device cuda --methods svd gram

Each shape is timed (eigenvalues + all metrics) after one warm-up; the estimate for the whole model is
sum over shapes of time * count (32 layers). Writes bench/results/shapes_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {  # module: (out, in), Llama-3-8B, 32 layers
    "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--methods", nargs="+", default=["svd", "gram"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    args = ap.parse_args()
    import torch

    from llmscape.devices import pick_device
    from llmscape.spectra import esd, stream

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device(args.device, key="--device")
    res = {}
    for method in args.methods:
        per = {}
        for mod, (o, i) in SHAPES.items():
            if mod in ("v_proj",) or (mod == "up_proj"):  # same shape as k_proj / gate_proj
                per[mod] = per["k_proj" if mod == "v_proj" else "gate_proj"]
                continue
            W = torch.randn(o, i, dtype=torch.bfloat16)
            ev = stream.compute_eigenvalues(W, method, dev)  # warm-up
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            ev = stream.compute_eigenvalues(W, method, dev)
            t1 = time.perf_counter()
            esd.compute_metrics(ev, o, i)
            t2 = time.perf_counter()
            per[mod] = dict(eigen_s=t1 - t0, metrics_s=t2 - t1)
            print(f"{method:5s} {mod:10s} {o}x{i}: eigenvalues {t1 - t0:7.2f} s, metrics {t2 - t1:6.2f} s", flush=True)
        total = 32 * sum(v["eigen_s"] + v["metrics_s"] for v in per.values())
        res[method] = dict(per_matrix=per, estimated_224_matrices_s=total)
        print(f"{method}: estimated whole Llama-3-8B (224 matrices) {total / 60:.1f} min on {dev}")
    info = dict(device=dev, gpu=torch.cuda.get_device_name(0) if dev.startswith("cuda") else None,
                torch_threads=torch.get_num_threads(), results=res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"shapes_{dev.split(':')[0]}.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
