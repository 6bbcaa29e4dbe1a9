"""Lowerings by op family; importing this package registers all of them."""
from converters.ops import (  # noqa: F401
    activation, conv, creation, elementwise, indexing, linalg, nn, random, reduction, shape, symbolic,
)
