"""One module per operation type; importing this package registers them all
(:mod:`adcert.bounds.registry`). See :mod:`adcert.bounds.layers.base` for the two interfaces an
operation implements. Order matters only for error messages (the supported list)."""
from adcert.bounds.layers import dense  # noqa: F401  (Conv2d, Linear, BatchNorm first)
from adcert.bounds.layers import relu  # noqa: F401
from adcert.bounds.layers import normalize  # noqa: F401
from adcert.bounds.layers import shape  # noqa: F401
from adcert.bounds.layers import avg_pool  # noqa: F401
from adcert.bounds.layers import max_pool  # noqa: F401
from adcert.bounds.layers import s_shaped  # noqa: F401
from adcert.bounds.layers import join  # noqa: F401
from adcert.bounds.layers import arith  # noqa: F401  (handled by the tracer)
