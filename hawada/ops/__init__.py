"""Fused ops: one entry point per op, with the torch reference as the always-available path.

``HAWADA_BACKEND`` (``auto`` | ``triton`` | ``torch``) selects the implementation.
"""

from hawada.ops.gated_linear import gated_linear, gated_linear_ref

__all__ = ["gated_linear", "gated_linear_ref"]
