"""Quantizing a registered model's file: ONNX to int8 with ONNX Runtime's quantizer, GGUF with llama.cpp's.

ONNX: ``quantize_dynamic`` turns every MatMul with a constant weight into int8 weights (per output channel
or per tensor) and activations quantized at run time (``DynamicQuantizeLinear`` + ``MatMulInteger``). It
quantizes float weights only, so a model that stores its weights as int8 and expands them at run time
(``Cast`` then ``Mul`` by a scale: the bundled all-MiniLM-L6-v2 is such a weight-only int8 export, and no
fp32 copy of it ships in a package) has those expansions folded into float initializers first. The fold is
exact (the same arithmetic, done once), so the model quantized is the same function as the one registered.

GGUF: ``llama_model_quantize`` rewrites every tensor into the target type, re-quantizing already quantized
tensors (``allow_requantize``), which loses more than quantizing from f16 would: the gate measures it.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from lamina.errors import EngineError, InvalidRequestError
from lamina.models._formats import ModelFormat

if TYPE_CHECKING:
    import onnx

QuantMethod = Literal[
    "onnx-int8-per-channel",
    "onnx-int8-per-tensor",
    "onnx-uint8-per-tensor",
    "gguf-q4_0",
    "gguf-q4_1",
    "gguf-q5_0",
    "gguf-q5_1",
    "gguf-q8_0",
    "gguf-q4_k_m",
    "gguf-q5_k_m",
    "gguf-q6_k",
]
METHODS: tuple[str, ...] = get_args(QuantMethod)

#: llama.cpp's ``llama_ftype`` per GGUF method (the ``LLAMA_FTYPE_MOSTLY_*`` values)
_GGUF_FTYPES = {
    "gguf-q4_0": 2,
    "gguf-q4_1": 3,
    "gguf-q8_0": 7,
    "gguf-q5_0": 8,
    "gguf-q5_1": 9,
    "gguf-q4_k_m": 15,
    "gguf-q5_k_m": 17,
    "gguf-q6_k": 18,
}


#: the ONNX operators quantized (those with a constant weight matrix)
_QUANTIZED_OPS = {"MatMul", "Gemm"}


def check_method(method: str, fmt: ModelFormat, ref: str) -> str:
    """``method`` if it applies to a ``fmt`` model, else an error listing the ones that do."""
    fitting = [m for m in METHODS if m.startswith(f"{fmt}-")]
    if method not in fitting:
        raise InvalidRequestError(
            f"{method!r} is not a quantization method for {ref} ({fmt}); use one of: "
            + (", ".join(fitting) or f"none ({fmt} models cannot be quantized here)"),
            param="method",
        )
    return method


def quantize_file(source: Path, method: str, out: Path, *, threads: int = 0) -> Path:
    """Write ``source`` quantized by ``method`` to ``out``; returns ``out``."""
    if method.startswith("onnx-"):
        _quantize_onnx(source, method, out)
    else:
        _quantize_gguf(source, _GGUF_FTYPES[method], out, threads)
    return out


def _quantize_onnx(source: Path, method: str, out: Path) -> None:
    import onnx  # heavy imports, needed only here
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    folded = fold_weight_expansions(model)
    weight_type = QuantType.QUInt8 if method == "onnx-uint8-per-tensor" else QuantType.QInt8
    # the quantizer logs a hint to run its pre-processing (shape inference) on the root logger; the
    # MatMuls it quantizes here have constant weights of known shape, so the hint is noise
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(
            folded,
            out,
            per_channel=method == "onnx-int8-per-channel",
            weight_type=weight_type,
            op_types_to_quantize=sorted(_QUANTIZED_OPS),
        )
    except (ValueError, RuntimeError) as exc:
        raise EngineError(f"ONNX Runtime could not quantize {source} with {method}: {exc}") from exc
    finally:
        root.setLevel(level)


def fold_weight_expansions(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each int8 initializer expanded at run time (``Cast`` to float, ``Mul`` by a constant
    scale) replaced by the float initializer it computes; returns the same (edited) ModelProto."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    users: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node.op_type)
    dropped_nodes: set[int] = set()
    dropped_inits: set[str] = set()
    folded = []
    for node in graph.node:
        cast = producer.get(node.input[0]) if node.op_type == "Mul" and len(node.input) == 2 else None
        if cast is None or cast.op_type != "Cast" or len(users.get(cast.output[0], [])) != 1:
            continue
        if not set(users.get(node.output[0], [])) <= _QUANTIZED_OPS:
            continue  # e.g. an embedding table read by Gather: left as it is stored (int8, weight-only)
        q, scale = inits.get(cast.input[0]), inits.get(node.input[1])
        if q is None or scale is None or q.data_type != onnx.TensorProto.INT8:
            continue
        weights = numpy_helper.to_array(q).astype(np.float32) * numpy_helper.to_array(scale)
        folded.append(numpy_helper.from_array(weights.astype(np.float32), node.output[0]))
        dropped_nodes |= {id(node), id(cast)}
        dropped_inits |= {cast.input[0], node.input[1]}
    kept = [n for n in graph.node if id(n) not in dropped_nodes]
    del graph.node[:]
    graph.node.extend(kept)
    still_used = {name for n in kept for name in n.input}
    inits_kept = [t for t in graph.initializer if t.name not in dropped_inits or t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend([*inits_kept, *folded])
    return model


def _quantize_gguf(source: Path, ftype: int, out: Path, threads: int) -> None:
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = threads
    with suppress_stdout_stderr(disable=False):  # llama.cpp logs a line per tensor
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0 or not out.is_file():
        raise EngineError(
            f"llama.cpp could not quantize {source} (return code {rc}); check that it is a complete GGUF "
            "model and that the disk has room for the output"
        )
