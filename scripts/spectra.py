"""Rules spectra and spectra_run: per-matrix weight-spectrum metrics of model variants (any model card) to
parquet, one table per variant (spectra_run: a fine-tuning run and its checkpoints in one job)."""

from llmscape import rulekit

log = rulekit.start(snakemake, "spectra")  # noqa: F821

from threadpoolctl import threadpool_limits  # noqa: E402  (installed with scikit-learn)

threadpool_limits(max(1, int(snakemake.threads)))  # numpy's LAPACK uses the rule's threads, not the node's  # noqa: F821

from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from llmscape.io import write_parquet  # noqa: E402
from llmscape.models import read_card  # noqa: E402
from llmscape.spectra import stream  # noqa: E402

cfg = snakemake.params.spectra  # noqa: F821
torch.set_num_threads(max(1, int(snakemake.threads)))  # noqa: F821
esd_options = dict(min_evals=cfg["min_evals"], tw_scale=cfg["tw_scale"], ks=cfg["ks"], peak_bins=cfg["peak_bins"],
                   peak_window=tuple(cfg["peak_window"]), mp_quantiles=tuple(cfg["mp_quantiles"]))
# rule spectra: one card and one table; rule spectra_run: a run's cards and tables, in the same order
if "cards" in snakemake.input.keys():  # noqa: F821
    pairs = list(zip(snakemake.input.cards, snakemake.output.tables))  # noqa: F821
else:
    pairs = [(snakemake.input.card, snakemake.output.table)]  # noqa: F821
for card_file, table in pairs:
    card = read_card(card_file)
    variant = Path(table).stem  # results/spectra/{model}/{variant}.parquet
    df = stream.compute_spectra(card["path"], model=snakemake.wildcards.model,  # noqa: F821
                                variant=variant, device=cfg["device"], method=cfg["method"],
                                modules=tuple(cfg["modules"]), include_embeddings=cfg["include_embeddings"],
                                esd_options=esd_options, adapter=card.get("adapter"))
    write_parquet(table, df)
    log.info("%d matrices of %s/%s on %s (%s) in %.1f s; mean alpha_ks %.3f, mean stable rank %.2f", len(df),
             card["label"], card["variant"], df.attrs["device"], cfg["method"], df["seconds"].sum(),
             df["alpha_ks"].mean(), df["stable_rank"].mean())
