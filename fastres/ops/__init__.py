"""Custom ops, one file per fused op (schema, fake, autograd, backend dispatch, reference)."""
from fastres.ops import batch_norm_act  # noqa: F401
from fastres.ops import norm_conv  # noqa: F401
