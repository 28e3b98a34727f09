"""Rule correlate: spectra x geometry correlations, deltas across variants, stable-rank interventions and
eigenvalue-ratio trajectories during fine-tuning."""

from llmscape import rulekit

log = rulekit.start(snakemake, "join")

from llmscape.io import read_json, read_parquet, write_json, write_parquet
from llmscape.join import correlate
from llmscape.join.columns import spec_col
from llmscape.join.report import write_csv as to_csv

smk = snakemake
cfg = smk.params.join
joined = read_parquet(smk.input.joined)
spectral = [spec_col(m, mod, s) for m in cfg["spectral_metrics"] for mod in cfg["modules"] for s in cfg["stats"]]
missing = [c for c in spectral if c not in joined.columns]
if missing:
    raise ValueError(f"join.spectral_metrics / modules / stats name columns the joined table lacks: {missing[:10]}. "
                     "Fix: use metric names of the spectra table and modules among q_proj..down_proj, attn, mlp, all.")
geometry = list(cfg["geometry_metrics"])
opts = dict(methods=cfg["methods"], n_boot=int(cfg["n_boot"]), seed=int(cfg["seed"]), level=float(cfg["ci"]))
log.info("%d spectral x %d geometry columns, %s, %d bootstrap resamples", len(spectral), len(geometry),
         cfg["methods"], opts["n_boot"])

corr = correlate.layer_correlations(joined, spectral, geometry, pooled=bool(cfg["pooled"]), **opts)
write_parquet(smk.output.correlations, corr)
top = correlate.top_correlations(corr, k=int(cfg["top_k"]), method=cfg["methods"][0])


to_csv(top, smk.output.top)

deltas = correlate.variant_deltas(joined, spectral + geometry)
write_parquet(smk.output.deltas, deltas)
dcorr = correlate.delta_correlations(deltas, spectral, geometry, **opts)
to_csv(dcorr, smk.output.delta_correlations)

iv = correlate.intervention_table(joined, geometry)
write_parquet(smk.output.interventions, iv)
to_csv(correlate.intervention_effects(iv, geometry), smk.output.intervention_effects)

runs = {r: read_json(p) for r, p in zip(smk.params.runs, smk.input.finetune, strict=True)}
ckpts = {(r, int(s)): read_parquet(p) for (r, s), p in zip(smk.params.checkpoints, smk.input.checkpoints, strict=True)}
base_spectra = read_parquet(smk.input.base_spectra) if ckpts else None
traj = correlate.trajectories(ckpts, runs, modules=cfg["modules"], window=int(cfg["gap_window"]),
                              base_spectra=base_spectra)
write_parquet(smk.output.trajectories, traj)
tcorr = correlate.trajectory_correlations(traj)
to_csv(tcorr, smk.output.trajectory_correlations)

write_json(smk.output.summary, dict(
    n_rows=len(joined), variants=sorted(joined["variant"].unique()),
    shots=sorted(int(k) for k in joined["shots"].unique()),
    n_correlations=len(corr), top=top.head(10).to_dict(orient="records"),
    n_deltas=len(deltas), n_intervention_rows=len(iv), n_checkpoints=len(ckpts), config=cfg))
log.info("wrote %d correlations, %d delta rows, %d intervention rows, %d trajectory rows",
         len(corr), len(deltas), len(iv), len(traj))
