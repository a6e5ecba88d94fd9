"""The teacher as an exponential moving average of the student.

All parameters are averaged, the head's BatchNorm scale and bias included (they are parameters);
BatchNorm running statistics are not (the teacher keeps the ones its own forward passes produce).
"""

from typing import Any

import jax
import jax.numpy as jnp


def ema_update(teacher: Any, student: Any, momentum: jnp.ndarray | float) -> Any:
    """teacher <- momentum * teacher + (1 - momentum) * student, leaf by leaf."""
    return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s.astype(t.dtype), teacher, student)
