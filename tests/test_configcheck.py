"""The configuration checks the DAG build runs across keys (llmscape.configcheck), called directly on
each shipped config with the schema's defaults filled in, as the workflow sees it, and on bad edits of
it: every error names the key, the value and the fix. Seconds, no Snakemake run."""
import copy
import re
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from llmscape.configcheck import (
    RESOURCE_GROUPS,
    RULE_GROUPS,
    ConfigError,
    check_geometry_scales,
    check_intervals,
    check_join_names,
    check_resource_groups,
)
from llmscape.data import analysis_subject_sizes
from llmscape.finetune.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["config.yaml", "ci.yaml", "llama3-8b.yaml", "llama3-70b.yaml"]


def load(name: str) -> dict:
    """A config file as the workflow sees it: the file alone (a --configfile replaces the embedded
    default), then the schema's defaults."""
    cfg = yaml.safe_load((ROOT / "config" / name).read_text())
    validate(cfg, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"), set_default=True)
    return cfg


@pytest.fixture(scope="module")
def configs():
    return {name: load(name) for name in SHIPPED}


def run_all(cfg: dict, variants=("base",)) -> None:
    """Every check, as workflow/rules/common.smk and functions/geometry.smk call them."""
    shots = [int(k) for k in cfg["extract"]["shots"] + (cfg["extract"].get("variant_shots") or [])]
    sizes = analysis_subject_sizes(cfg["data"])
    check_resource_groups(cfg["resources"], METHODS, shots)
    check_geometry_scales(cfg["geometry"], sizes)
    check_intervals(cfg["geometry"], sizes)
    check_join_names(cfg["join"], list(variants))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_pass_every_check(configs, name):
    run_all(configs[name])


def edited(configs, name, section, **change):
    cfg = copy.deepcopy(configs[name])
    cfg[section].update(change)
    return cfg


def fails(cfg, *parts, variants=("base",)):
    with pytest.raises(ConfigError) as e:
        run_all(cfg, variants)
    msg = str(e.value)
    for part in parts:
        assert part in msg, msg
    return msg


def test_misspelt_resources_group_is_named_with_the_closest_group(configs):
    cfg = edited(configs, "ci.yaml", "resources", extarct={"mem_mb": 9000})
    fails(cfg, "resources.extarct = {'mem_mb': 9000}: no rule reads", "Fix: did you mean 'extract'?")


@pytest.mark.parametrize("key, near", [("finetune_lora_adaptiv", "finetune_lora_adaptive"),
                                       ("extract_5shots", "extract_5shot")])
def test_per_method_and_per_shot_groups_are_known_and_near_misses_are_not(configs, key, near):
    cfg = edited(configs, "llama3-8b.yaml", "resources", finetune_lora_adaptive={"runtime": 5},
                 extract_5shot={"runtime": 9})
    run_all(cfg)  # the real per-method and per-shot groups pass
    cfg["resources"][key] = {"runtime": 5}
    fails(cfg, f"resources.{key} = ", f"did you mean {near!r}?")


def test_a_rule_name_used_as_a_group_names_the_group_the_rule_reads(configs):
    cfg = edited(configs, "ci.yaml", "resources", geometry_resolution={"runtime": 5})
    fails(cfg, "resources.geometry_resolution = {'runtime': 5}", "Fix: set it under resources.geometry, the group "
          "rule geometry_resolution reads")


def test_rule_to_group_hints_match_the_rules():
    """RULE_GROUPS (the hint) against the rule files: each rule with resources and the group it reads."""
    found = {}
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        for block in re.split(r"\n(?=\s*rule )", smk.read_text())[1:]:  # rules inside an if are indented
            named = re.match(r"\s*rule (\w+):", block)
            if named is None:  # an anonymous rule: no name to hint at
                continue
            name = named.group(1)
            group = re.search(r"\*\*res\(\"(\w+)\"", block)
            if group:
                found[name] = group.group(1)
            elif "finetune_resources()" in block:
                found[name] = "finetune"
    assert found == RULE_GROUPS
    assert set(found.values()) <= set(RESOURCE_GROUPS)


def test_one_subsample_is_refused_and_zero_is_no_intervals(configs):
    fails(edited(configs, "ci.yaml", "geometry", n_boot=1), "geometry.n_boot = 1", "Fix: geometry.n_boot: 0")
    run_all(edited(configs, "ci.yaml", "geometry", n_boot=0))
    run_all(edited(configs, "ci.yaml", "geometry", n_boot=15))  # the fewest for 95% intervals
    fails(edited(configs, "ci.yaml", "geometry", n_boot=14), "geometry.n_boot = 14", "at least 15 subsamples")
    fails(edited(configs, "ci.yaml", "geometry", n_boot=20, confidence=0.99), "geometry.n_boot = 20",
          "at least 22 subsamples", "Fix: geometry.n_boot: 22 or more")


def test_subsamples_too_small_for_the_scales_are_refused(configs):
    cfg = edited(configs, "ci.yaml", "geometry", boot_fraction=0.05, density_k=8, id_scale=4)
    cfg["data"]["per_subject"] = 24  # 4 subjects x round(0.05 x 24) = 4 questions per subsample
    fails(cfg, "geometry.boot_fraction = 0.05: a subsample keeps 4 questions", "Fix: a larger geometry.boot_fraction")


@pytest.mark.parametrize("change, parts", [
    ({"id_scale": 12}, ["geometry.id_scale = 12: Gride's scales", "Fix: a power of two, 8 or 16"]),
    ({"id_range_max": 16},
     ["geometry.id_range_max = 16 is below 2 x geometry.id_scale = 32", "Fix: id_range_max >= 32"]),
    ({"maxk": 20}, ["geometry.maxk = 20 is below 2 x geometry.id_scale = 32", "Fix: maxk >= 32"]),
    ({"maxk": 40, "density_k": 60}, ["geometry.density_k = 60 is above geometry.maxk = 40", "Fix: density_k <= 40"]),
])
def test_neighbour_scales_that_fail_every_layer_are_refused(configs, change, parts):
    fails(edited(configs, "config.yaml", "geometry", **change), *parts)


def test_maxk_above_the_questions_is_allowed(configs):
    """Each layer caps maxk at its points - 1 (the CI config's 96 questions under the default maxk 1000)."""
    run_all(edited(configs, "ci.yaml", "geometry", maxk=1000, id_range_max=100))


def test_too_few_questions_for_the_scales_are_refused(configs):
    cfg = copy.deepcopy(configs["ci.yaml"])
    cfg["data"].update(subjects=["anatomy"], per_subject=8)
    cfg["geometry"]["resolution_study"]["enabled"] = False
    fails(cfg, "data: the analysis subset holds 8 questions", "fewer than the 9 that id_scale = 4",
          "Fix: more questions (data.per_subject, data.subjects)")


def test_resolution_sizes_below_the_scales_are_refused(configs):
    cfg = edited(configs, "ci.yaml", "geometry", id_scale=8, density_k=8)
    cfg["geometry"]["resolution_study"]["sizes"] = [2, 8, 16]  # 4 subjects: 8 points < 17
    fails(cfg, "geometry.resolution_study.sizes = [2, 8, 16]: [2] question(s) per subject x 4 subject(s)",
          "Fix: sizes >= 5")


@pytest.mark.parametrize("key, value, among", [("module", "attn", "modules"), ("stat", "median", "stats"),
                                               ("method", "pearson", "methods")])
def test_heatmap_of_something_not_correlated_is_refused(configs, key, value, among):
    cfg = copy.deepcopy(configs["ci.yaml"])
    cfg["join"][among] = [v for v in cfg["join"][among] if v != value] or ["mean"]
    cfg["join"]["heatmap"][key] = value
    fails(cfg, f"join.heatmap.{key} = {value!r} is not in join.{among}", f"Fix: add {value!r} to join.{among}")


@pytest.mark.parametrize("key, names, parts", [
    ("variants", ["base", "lora-r8"], ["join.variants = ['base', 'lora-r8']: 'lora-r8' is not one of base, lora-r16",
                                       "Fix: did you mean 'lora-r16'?"]),
    ("spectral_metrics", ["stable_rank", "alpha_kss"], ["'alpha_kss' is not one of", "did you mean 'alpha_ks'?"]),
    ("geometry_metrics", ["id_gride", "ari_subject"], ["'ari_subject' is not one of", "did you mean 'ari_subjects'?"]),
])
def test_join_names_that_do_not_exist_are_refused(configs, key, names, parts):
    fails(edited(configs, "ci.yaml", "join", **{key: names}), *parts, variants=("base", "lora-r16"))
