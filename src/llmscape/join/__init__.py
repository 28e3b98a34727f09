"""Join weight spectra with representation geometry: tables, correlations, figures.

Modules
-------
``columns``    the one place where the other stages' column names are listed (geometry table, spectra
               table, fine-tuning metrics JSON, extraction accuracy JSON); adjust here when they move.
``tables``     the joined tidy table per model: one row per (variant, shots, layer), with row-count
               checks at every join (a mismatch is a :class:`JoinError` naming what is missing).
``correlate``  Spearman / Pearson (scipy) with partial correlations controlling for depth and percentile
               bootstrap CIs (fixed seed); deltas against the base model across variants; stable-rank
               interventions; eigenvalue-ratio trajectories during fine-tuning against the generalisation gap.
``plots``      correlation heatmap, ID / alpha overlays, ARI panels, accuracy against trainable parameters,
               intervention and checkpoint figures, paired-difference bands of the geometry (matplotlib, Agg).

Layer matching (``join.layer_match``)
-------------------------------------
Geometry ``layer`` l indexes the extraction's ``hidden`` array: for l < L it is the representation
entering decoder block l (after that block's input norm), l = L is the final-norm output (L = number of
decoder blocks). Spectra ``layer`` b is decoder block b.

* ``producer`` (default): geometry layer l is joined with block ``l - 1``, the last block whose weights
  shaped it (the representation entering block l is the output of block l - 1; the final-norm output
  l = L comes from block L - 1). Layer 0 (embeddings) has no producing block: it is kept, with
  ``block`` = <NA> and NaN spectral columns. Every block is matched exactly once.
* ``consumer``: geometry layer l is joined with block l, the block that reads it. Layer L (final norm)
  has no consuming block and keeps NaN spectral columns.
"""

from .columns import JoinError

__all__ = ["JoinError"]
