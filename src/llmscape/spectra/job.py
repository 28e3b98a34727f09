"""The body of the spectra jobs (rules spectra and spectra_run): each model card's matrices streamed
through :func:`llmscape.spectra.stream.compute_spectra` into its parquet table, one card after another."""

from __future__ import annotations

import logging
from pathlib import Path

from ..io import write_parquet
from ..models import read_card
from .stream import compute_spectra


def esd_options(cfg: dict) -> dict:
    """The ``spectra`` config keys that :func:`llmscape.spectra.esd.compute_metrics` takes."""
    return dict(min_evals=cfg["min_evals"], tw_scale=cfg["tw_scale"], ks=cfg["ks"], peak_bins=cfg["peak_bins"],
                peak_window=tuple(cfg["peak_window"]), mp_quantiles=tuple(cfg["mp_quantiles"]))


def write_tables(pairs: list[tuple[str, str]], model: str, cfg: dict, log: logging.Logger) -> None:
    """For each (model card, table) pair: the variant's spectra (its name is the table's stem,
    results/spectra/{model}/{variant}.parquet), written whole under a temporary name."""
    for card_file, table in pairs:
        card = read_card(card_file)
        df = compute_spectra(card["path"], model=model, variant=Path(table).stem, device=cfg["device"],
                             method=cfg["method"], modules=tuple(cfg["modules"]),
                             include_embeddings=cfg["include_embeddings"], esd_options=esd_options(cfg),
                             adapter=card.get("adapter"))
        write_parquet(table, df)
        log.info("%d matrices of %s/%s on %s (%s) in %.1f s; mean alpha_ks %.3f, mean stable rank %.2f", len(df),
                 card["label"], card["variant"], df.attrs["device"], cfg["method"], df["seconds"].sum(),
                 df["alpha_ks"].mean(), df["stable_rank"].mean())
