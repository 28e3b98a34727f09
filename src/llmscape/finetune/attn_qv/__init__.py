"""``attn-qv``: tune W_q and W_v only (K frozen), by LoRA or fully, with value lr = lambda * query lr
(Yao et al., IJCAI 2025). Where 1-D parameters (biases) go is the explicit option ``one_d``:
``query`` (lr eta, the default), ``value`` (lr lambda * eta, what the published code does implicitly) or
``frozen``. Llama has no q/v biases, so the choice only matters for models with them (Qwen, OPT...)."""

from ..method import Method
from .model import AXES, NAME, Options, apply, expected_trainable, param_groups, targets

__all__ = ["AXES", "METHOD", "NAME", "Options", "apply", "expected_trainable", "param_groups", "targets"]

METHOD = Method(name=NAME, axes=AXES, options=Options, targets=targets, expected_trainable=expected_trainable,
                apply=apply, param_groups=param_groups)
