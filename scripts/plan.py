"""What a configuration will cost before it is submitted: jobs per rule, GPU and CPU hours, disk.

    python3 scripts/plan.py config/llama3-8b.yaml          # or: make plan CONFIG=config/llama3-8b.yaml
    python3 scripts/plan.py config/llama3-8b.yaml --json   # the plan as JSON

Config files are merged in order and completed with the schema's defaults, as the workflow does.
See src/llmscape/plan.py for where every number comes from.
"""
import argparse
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def merged_config(files) -> dict:
    from snakemake.utils import validate

    from llmscape.configcheck import read_config_file

    def update(a, b):
        for k, v in b.items():
            a[k] = update(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else copy.deepcopy(v)
        return a

    cfg: dict = {}
    for f in files:
        update(cfg, read_config_file(f))  # a missing file, or a YAML error's line and column, named
    validate(cfg, str(ROOT / "workflow/schemas/config.schema.yaml"), set_default=True)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configfiles", nargs="+")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from llmscape.configcheck import ConfigError
    from llmscape.plan import PlanError, format_plan, plan

    try:
        p = plan([Path(f).resolve() for f in a.configfiles], ROOT, merged_config(a.configfiles))
    except (PlanError, ConfigError) as e:
        sys.exit(str(e))
    print(json.dumps(p, indent=2, default=str) if a.json else format_plan(p))


if __name__ == "__main__":
    main()
