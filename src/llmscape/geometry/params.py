"""Parameters, statuses and the column lists of the geometry tables (a contract with the join)."""

from __future__ import annotations

from dataclasses import dataclass, fields

STATUS_OK = "ok"


class GeometryError(RuntimeError):
    """The whole input is unusable (missing datasets, misaligned pairs, no usable layer)."""


@dataclass
class GeometryParams:
    maxk: int = 1000  # neighbours for ID / density / ADP (the paper: 1000)
    id_range_max: int = 100  # Gride scales up to this neighbour rank (the paper: 100 -> 6 scales)
    id_scale: int = 16  # n1 of the headline Gride scale (16, 32)
    density_k: int = 16
    z: float = 1.6
    label_fraction: float = 0.3
    overlap_k: int = 30
    device: str = "auto"
    precision: str = "float32"
    block_rows: int = 2048  # smaller blocks: more of the symmetric products skipped (bench/)
    refine_tol: float = 1e-4

    @classmethod
    def from_config(cls, cfg: dict | None) -> "GeometryParams":
        cfg = dict(cfg or {})
        names = {f.name for f in fields(cls)}
        unknown = set(cfg) - names
        if unknown:
            raise ValueError(f"unknown geometry parameters: {sorted(unknown)}")
        return cls(**cfg)

    def min_points(self) -> int:
        """Fewest distinct points a layer needs: the headline Gride scale and the density k must fit."""
        return max(2 * self.id_scale, self.density_k, 2) + 1



TABLE_COLUMNS = ["model", "variant", "shots", "layer", "layer_name", "status", "n_questions", "n_points",
                 "n_duplicates", "maxk", "id_2nn", "id_gride", "id_gride_err", "id_scale_n1", "density_k",
                 "log_density_mean", "z", "n_clusters", "core_fraction", "ari_subjects", "ari_letters",
                 "label_fraction", "overlap_subjects", "overlap_letters", "overlap_k", "overlap_next_layer",
                 "seconds_graph", "seconds_metrics", "device"]
GRIDE_COLUMNS = ["model", "variant", "shots", "layer", "n1", "n2", "id", "err"]
OVERLAP_COLUMNS = ["model", "variant", "shots", "layer", "layer_name", "comparison", "ref_variant", "ref_shots",
                   "k", "n_points", "overlap"]
