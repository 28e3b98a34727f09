"""Weight spectra per matrix, spectrum-adaptive LoRA ranks, and controlled stable-rank interventions.

Modules
-------
``esd``        pure numerics on one eigenvalue vector (norms, Hill/KS power law, Marchenko-Pastur,
               Tracy-Widom, entropy); every definition is in its docstring.
``stream``     streams the matrices of any safetensors folder one tensor at a time, SVD / Gram in torch.
``adaptive``   spectrum-adaptive LoRA rank / alpha patterns (peft-ready JSON).
``intervene``  sets the stable rank of a module group to a target, writes a new model variant.
``plots``      metrics against depth, one panel per module type.

Spectra table (``results/spectra/{model}/{variant}.parquet``), one row per weight matrix, key
(model, variant, layer, module). Column names are stable; the join stage aggregates them per
(layer, module):

====================  ==========================================================================
model, variant        model label and variant name (from the model card)
layer                 int, decoder layer index; -1 for embed_tokens / lm_head
module                q_proj k_proj v_proj o_proj gate_proj up_proj down_proj embed_tokens lm_head
name                  full tensor name, e.g. ``model.layers.3.mlp.down_proj.weight``
shape_out, shape_in   weight shape (out_features, in_features)
n_evals               min(shape): number of eigenvalues lambda = s^2 of W^T W
rank                  numerical rank, #{s > s_1 * max(shape) * eps_float32}
fro_norm_sq           ||W||_F^2 = sum(lambda)
spectral_norm         ||W||_2 = s_1 (not squared)
stable_rank           ||W||_F^2 / ||W||_2^2
eig_ratio             rho = s_1 / sqrt(sum_{j>=2} s_j^2); stable_rank = 1 + 1/rho^2 (inf for rank one)
log_norm              log10(fro_norm_sq)             (WeightWatcher's log_norm)
log_spectral_norm     log10(s_1^2)                   (WeightWatcher's log_spectral_norm)
alpha_median, ks_distance_median, xmin_median      Hill alpha with x_min at the median eigenvalue
alpha_ks, ks_distance, xmin, num_pl_spikes         Hill alpha with x_min minimising the KS distance
                                                   (WeightWatcher's default ``alpha``); tail size
alpha_peak, ks_distance_peak, xmin_peak            KS scan restricted to the ESD peak window
alpha_weighted        alpha_ks * log10(s_1^2)        (WeightWatcher's alpha_weighted / alphahat)
log_alpha_norm        log10 sum(lambda^alpha_ks)
sigma_mp_mean         MP entry scale from the mean eigenvalue, ||W||_F / sqrt(N M)
sigma_mp_fit          MP entry scale fitted to the ESD bulk quantiles
mp_edge_mean, mp_edge_fit   MP bulk edge N sigma^2 (1 + sqrt(M/N))^2, eigenvalue units
tw                    Tracy-Widom scale at the edge, unit lambda / (N sigma^2)
num_spikes            #{lambda > edge + tw_scale * tw}, fitted sigma
num_spikes_mean       the same with sigma_mp_mean (AR-LoRA's spike count)
mp_softrank           mp_edge_fit / s_1^2
entropy               normalised matrix entropy of lambda / sum(lambda)
seconds               wall time of this matrix (eigenvalues + metrics)
====================  ==========================================================================

Integer columns (n_evals, rank, num_pl_spikes, num_spikes, num_spikes_mean) are nullable Int64;
undefined metrics are NaN (see ``esd`` for degenerate matrices).
"""

from .esd import METRICS, DegenerateMatrixWarning, compute_metrics

__all__ = ["COLUMNS", "KEY", "METRICS", "DegenerateMatrixWarning", "compute_metrics"]

KEY = ("model", "variant", "layer", "module")
COLUMNS = KEY + ("name", "shape_out", "shape_in") + METRICS + ("seconds",)
