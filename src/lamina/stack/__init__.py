"""The composition root: reads the config once, builds each layer and wires them together; no layer logic.

``open_data_stack`` wires the data layer alone (what ``lamina data`` uses, with no web server imported);
``lamina.stack.gateway`` wires the whole stack around the gateway (``build_stack``, ``serve``) and is
imported only by the commands that run it. Nothing else in Lamina reads the environment or builds layers
from global state.
"""

from lamina.stack._data import (
    DataStack,
    checked_config,
    open_data_stack,
    open_registry,
    open_store,
    open_vectors,
)
from lamina.stack._fit import ReplicaNeed, check_fit, model_need

__all__ = [
    "DataStack",
    "ReplicaNeed",
    "check_fit",
    "checked_config",
    "model_need",
    "open_data_stack",
    "open_registry",
    "open_store",
    "open_vectors",
]
