"""The composition root: reads the config once, builds each layer and wires them together; no layer logic.

``open_data_stack`` wires the data layer alone (what ``lamina data`` uses, with no web server imported);
``lamina.stack.gateway`` wires the whole stack around the gateway (``build_stack``, ``serve``) and is
imported only by the commands that run it. Nothing else in Lamina reads the environment or builds layers
from global state.
"""

from lamina.stack._backends import backend_nodes, ray_temp_dir, replica_backend
from lamina.stack._data import (
    DataStack,
    checked_config,
    open_data_stack,
    open_registry,
    open_store,
    open_vectors,
)
from lamina.stack._fit import ReplicaNeed, check_fit, model_need
from lamina.stack._jobs import job_capacity, job_kinds, open_job_queue, serving_demands
from lamina.stack._k8s import K8sSettings, kubectl_apply, write_k8s_manifests
from lamina.stack._served_names import unknown_names

__all__ = [
    "DataStack",
    "K8sSettings",
    "ReplicaNeed",
    "backend_nodes",
    "check_fit",
    "checked_config",
    "job_capacity",
    "job_kinds",
    "kubectl_apply",
    "model_need",
    "open_data_stack",
    "open_job_queue",
    "open_registry",
    "open_store",
    "open_vectors",
    "ray_temp_dir",
    "replica_backend",
    "serving_demands",
    "unknown_names",
    "write_k8s_manifests",
]
