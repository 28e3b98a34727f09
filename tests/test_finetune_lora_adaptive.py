"""Fine-tuning method lora-adaptive: its own properties (the shared training path is in test_finetune.py)."""
import pytest

from llmscape.finetune import grid, registry
from llmscape.finetune.common import FinetuneError


def test_missing_adaptive_rank_file(tmp_path):
    """The rank file, declared as the method's input: missing is an error unless a rule makes it; an
    explicit ``ranks_file`` is the file declared instead."""
    runs = grid.expand(dict(sweeps=[dict(method="lora-adaptive")]))
    (run,) = runs.values()
    default = registry.context(run, "tiny", {}).inputs["ranks"]
    assert default == "results/spectra/tiny/adaptive_ranks.json"

    def context(r):
        return registry.context(r, "tiny", {})

    with pytest.raises(FinetuneError, match=r"adaptive-rank file .*does not exist"):
        grid.validate(runs, None, context)
    grid.validate(runs, None, context, producible=lambda path: path == default)
    runs = grid.expand(dict(sweeps=[dict(method="lora-adaptive")],
                            methods={"lora-adaptive": dict(ranks_file=str(tmp_path / "x.json"))}))
    assert context(next(iter(runs.values()))).inputs == {"ranks": str(tmp_path / "x.json")}
    with pytest.raises(FinetuneError, match=r"x.json does not exist"):  # no rule makes it: it must exist now
        grid.validate(runs, None, context, producible=lambda path: path == default)
