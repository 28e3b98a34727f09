"""Fine-tuning method lora-adaptive: its own properties (the shared training path is in test_finetune.py)."""
import pytest

from llmscape.finetune import grid
from llmscape.finetune.common import Context, FinetuneError


def test_missing_adaptive_rank_file(tmp_path):
    runs = grid.expand(dict(sweeps=[dict(method="lora-adaptive")]))
    with pytest.raises(FinetuneError, match=r"adaptive-rank file .*does not exist"):
        grid.validate(runs, None, Context(adaptive_ranks=tmp_path / "nope.json"))
    grid.validate(runs, None, Context(adaptive_ranks=tmp_path / "nope.json"), adaptive_producible=True)
    runs = grid.expand(dict(sweeps=[dict(method="lora-adaptive")],
                            methods={"lora-adaptive": dict(ranks_file=str(tmp_path / "x.json"))}))
    with pytest.raises(FinetuneError, match=r"x.json does not exist"):  # an explicit file must exist now
        grid.validate(runs, None, adaptive_producible=True)
