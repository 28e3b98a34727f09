# Functions and settings of the geometry rules (workflow/rules/geometry.smk): targets, inputs, checks.
from llmscape.configcheck import GEOMETRY_SECTIONS, check_geometry_scales, check_intervals, check_replication
from llmscape.data import analysis_subject_sizes
from llmscape.geometry import GeometryParams
from llmscape.geometry.replicate import replication_shots as replication_shots_of

# the keys of geometry: that the geometry jobs read (the study's own section goes to its rule only)
GEOMETRY_PARAMS = {k: v for k, v in config["geometry"].items() if k not in GEOMETRY_SECTIONS}
STUDY = config["geometry"]["resolution_study"]
STUDY_SHOTS = max(SHOTS) if STUDY["shots"] is None else int(STUDY["shots"])


def _check_geometry_config():
    """Errors and warnings a researcher should see at DAG build, before any job runs."""
    params = GeometryParams.from_config(GEOMETRY_PARAMS)  # (the schema has checked every value)
    check_replication_config()
    sizes = analysis_subject_sizes(config["data"])
    check_geometry_scales(config["geometry"], sizes)  # what would fail every layer or give only NaN
    check_intervals(config["geometry"], sizes)
    need = params.resolution_size()
    if STUDY["enabled"]:
        if STUDY["variant"] not in model_variants():
            raise ValueError(
                f"geometry.resolution_study.variant = {STUDY['variant']!r} is not a variant of this run "
                f"({', '.join(model_variants())}). Fix: choose one of them (base is always there)."
            )
        if STUDY_SHOTS not in shots_of(STUDY["variant"]):
            raise ValueError(
                f"geometry.resolution_study.shots = {STUDY_SHOTS} is not extracted for {STUDY['variant']} "
                f"(shots {shots_of(STUDY['variant'])}). Fix: one of those, or null for the largest of extract.shots."
            )
    if not sizes:  # data.source csv: the subject sizes are known only once the files are read
        return
    smallest = min(sizes.values())
    if STUDY["enabled"]:
        big = [s for s in STUDY["sizes"] if s > smallest]
        if big:
            raise ValueError(
                f"geometry.resolution_study.sizes = {STUDY['sizes']} asks for {big} questions per subject, but the "
                f"smallest subject of the analysis subset has {smallest} (data.per_subject = "
                f"{config['data']['per_subject']}). Fix: sizes of at most {smallest}, or raise data.per_subject."
            )
    if smallest < need:
        print(
            f"WARNING: the smallest subject of the analysis subset has {smallest} questions, below the {need} that "
            f"density_k = {params.density_k} and the Gride scale ({params.id_scale}, {2 * params.id_scale}) "
            "resolve: its layers will be marked below resolution (docs/geometry.md). Fix: data.per_subject >= "
            f"{need} (fewer subjects if time is short), or smaller geometry.density_k and geometry.id_scale.",
            file=sys.stderr,
        )
    elif params.n_boot and round(params.boot_fraction * smallest) < need:
        print(
            f"WARNING: the subsamples of the intervals keep {round(params.boot_fraction * smallest)} questions of "
            f"the smallest subject, below the {need} that resolve it: the ARI intervals will be too wide. Fix: "
            f"geometry.boot_fraction >= {need / smallest:.2f}, or more questions per subject.",
            file=sys.stderr,
        )


def geometry_variants():
    return model_variants()


def geometry_references(model, variant, shots):
    """Paired extractions of the same questions: (comparison, ref_variant, ref_shots)."""
    refs = []
    if int(shots) != 0 and 0 in shots_of(variant):
        refs.append(("shots", variant, 0))
    if variant != "base" and int(shots) in shots_of("base"):
        refs.append(("variant", "base", int(shots)))
    return refs


def geometry_overlap_inputs(wildcards):
    return [
        f"results/geometry/{wildcards.model}/{v}/{k}shot_knn.npz"
        for _, v, k in geometry_references(wildcards.model, wildcards.variant, wildcards.shots)
    ]


def paired_extractions():
    """Every extraction of the model: (variant, shots)."""
    return [(v, int(k)) for v in geometry_variants() for k in shots_of(v)]


def paired_comparisons():
    """Every paired comparison between extractions: (variant, shots, comparison, ref_variant, ref_shots): those
    of the pair overlaps (k-shot vs 0-shot, variant vs base), and each shot count against the next smaller one
    above 0 (``shots_step``: 2 vs 1, 5 vs 2)."""
    out = []
    for v, k in paired_extractions():
        out += [(v, k, c, rv, int(rk)) for c, rv, rk in geometry_references(MODEL, v, k)]
        smaller = [int(s) for s in shots_of(v) if 0 < int(s) < k]
        if smaller:
            out.append((v, k, "shots_step", v, max(smaller)))
    return out


def geometry_paired_inputs(wildcards):
    """The layer tables, subsample values and neighbour-list records of every extraction, and the
    extractions themselves (for the answers), in the order of paired_extractions()."""
    stems = [f"results/geometry/{wildcards.model}/{v}/{k}shot" for v, k in paired_extractions()]
    return dict(
        tables=[f"{s}.parquet" for s in stems],
        boots=[f"{s}_boot.parquet" for s in stems],
        knns=[f"{s}_knn.npz" for s in stems],
        h5=[f"results/reps/{wildcards.model}/{v}/{k}shot.h5" for v, k in paired_extractions()],
    )


def paired_targets():
    stem = f"results/geometry/{MODEL}"
    return [
        f"{stem}/paired_differences.parquet",
        f"{stem}/paired_accuracy.csv",
        f"results/figures/geometry/{MODEL}/paired_layer.png",
    ]


def resolution_targets():
    if not STUDY["enabled"]:
        return []
    stem = f"{STUDY['variant']}_{STUDY_SHOTS}shot"
    return [
        f"results/geometry/{MODEL}/resolution/{stem}.parquet",
        f"results/figures/geometry/{MODEL}/resolution_{stem}.png",
    ]


def geometry_targets():
    out = []
    for variant in geometry_variants():
        for shots in shots_of(variant):
            out.append(f"results/geometry/{MODEL}/{variant}/{shots}shot.parquet")
            if geometry_references(MODEL, variant, shots):
                out.append(f"results/geometry/{MODEL}/{variant}/{shots}shot_overlap.parquet")
        out += expand(
            "results/figures/geometry/{model}/{variant}/{fig}.png",
            model=MODEL,
            variant=variant,
            fig=["ari", "id", "clusters"],
        )
    out.append(f"results/figures/geometry/{MODEL}/headline.html")  # the report's front page
    return out + resolution_targets() + paired_targets() + replication_targets()


# Replication (geometry.replication): the geometry of one variant's extractions repeated on disjoint subject sets,
# each cut from the extraction as a file of its own (replication_subset), analysed by the geometry rule
# (replication_geometry) and summarised over the sets (replication_summary). docs/geometry.md, "Replication".
REPLICATION = config["geometry"]["replication"]
REPLICATION_SET_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"


def replication_sets():
    """{set name: subjects}, empty when the replication is off or has no sets."""
    return dict(REPLICATION["sets"]) if REPLICATION["enabled"] else {}


def replication_shots():
    return replication_shots_of(REPLICATION, shots_of(REPLICATION["variant"]))


def replication_runs():
    """(set, shots) of every replication geometry job, in a fixed order (the summary's inputs zip with it)."""
    return [(s, k) for s in replication_sets() for k in replication_shots()]


def replication_summary_inputs(wildcards):
    stems = [
        f"results/geometry/{wildcards.model}/replication/{s}/{REPLICATION['variant']}/{k}shot"
        for s, k in replication_runs()
    ]
    return dict(
        tables=[f"{s}.parquet" for s in stems],
        boots=[f"{s}_boot.parquet" for s in stems],
        knns=[f"{s}_knn.npz" for s in stems],
    )


def replication_targets():
    if not replication_sets():
        return []
    return [
        f"results/geometry/{MODEL}/replication/replication.csv",
        f"results/figures/geometry/{MODEL}/replication_ari.png",
    ]


def check_replication_config():
    """geometry.replication against this run's subjects, variants and shot counts (before any job)."""
    check_replication(REPLICATION, config["data"], config["geometry"], {v: shots_of(v) for v in model_variants()})
