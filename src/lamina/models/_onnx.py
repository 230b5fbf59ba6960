"""The ONNX engine: sentence embeddings with ONNX Runtime and a Hugging Face ``tokenizers`` tokenizer.

A sentence-transformers model exported to ONNX returns one vector per token; the sentence vector is the
mean over the real (unpadded) tokens, L2-normalised, as sentence-transformers computes it.

Texts are batched by length, so that a batch pads to little more than its longest text, and each forward
pass holds at most ``batch_size`` texts and ``max_batch_tokens`` tokens padding included: on a CPU, passes
beyond a few hundred tokens run slower per token, not faster (their activations leave the caches).
``bench/embed_batching.py``, MiniLM on 2 cores, calls of 32 texts: abstracts of about 256 tokens at 14.5
texts/s with 512 tokens a pass (two abstracts) against 10.8 with all 32 in one; queries of about 20 tokens
at 150 texts/s against 103.

A model that quantizes its activations at run time (ONNX Runtime's ``quantize_dynamic``: one scale per
tensor, from the pass's own minimum and maximum) would give a text a vector that depends on the texts
beside it (cosine 0.992 between the two, for the int8 MiniLM): such a model embeds each text in a pass
of its own, so that a text always gets the same vector.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from lamina.compute import default_threads
from lamina.errors import ConfigError, EngineError, UnsupportedCapabilityError
from lamina.models._builtin_engines import ONNXOptions
from lamina.models._engine import (
    Capability,
    ChatMessage,
    Delta,
    EmbeddingBatch,
    EngineInfo,
    LoadSpec,
    SamplingParams,
)

CPU_PROVIDER = "CPUExecutionProvider"
#: the order tried when the config names none: fastest first, CPU as the fallback that always exists
DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", CPU_PROVIDER)


def choose_providers(preferred: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """The execution providers to ask ONNX Runtime for, best first, CPU last.

    With no preference, the defaults this build has. An explicitly requested provider that this build
    lacks is a configuration error rather than a silent fallback: the operator asked for a GPU.
    """
    if preferred is None:
        chosen = [p for p in DEFAULT_PROVIDERS if p in available and p != CPU_PROVIDER]
    else:
        missing = [p for p in preferred if p not in available]
        if missing:
            raise ConfigError(
                f"ONNX Runtime execution provider(s) {', '.join(missing)} not available in this "
                f"onnxruntime build; available: {', '.join(available)}. Remove them from onnx.providers "
                "or install a build that has them (e.g. onnxruntime-gpu)"
            )
        chosen = list(dict.fromkeys(p for p in preferred if p != CPU_PROVIDER))
    return [*chosen, CPU_PROVIDER]


FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


def mean_pool(hidden: FloatArray, mask: IntArray) -> FloatArray:
    """Mean of the token vectors where ``mask`` is 1, then L2-normalised."""
    weights = mask[:, :, None].astype(np.float32)
    summed = (hidden * weights).sum(axis=1)
    pooled = summed / np.clip(weights.sum(axis=1), 1e-9, None)
    return normalize(pooled)


def normalize(vectors: FloatArray) -> FloatArray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    out: FloatArray = (vectors / np.clip(norms, 1e-12, None)).astype(np.float32)
    return out


#: padded tokens per forward pass when ``max_batch_tokens`` is unset: on a CPU, and on a GPU provider
CPU_BATCH_TOKENS = 512
GPU_BATCH_TOKENS = 16384
#: operators that quantize activations with a scale computed from the whole pass
_RUN_TIME_QUANTIZATION = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"})


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (shortest first), each of at most ``batch_size``
    texts and ``max_tokens`` tokens once padded to its longest (a longer text has a batch of its own)."""
    batch: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batch and (len(batch) == batch_size or (len(batch) + 1) * lengths[i] > max_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def quantizes_at_run_time(path: str) -> bool:
    """Whether the ONNX model at ``path`` quantizes activations with a scale of the whole pass."""
    import onnx  # the graph only: its weights stay on disk

    graph = onnx.load(path, load_external_data=False).graph
    return any(node.op_type in _RUN_TIME_QUANTIZATION for node in graph.node)


class ONNXEngine:
    """An ONNX sentence-embedding model; embeddings only."""

    def __init__(self, spec: LoadSpec) -> None:
        try:
            self._options = ONNXOptions.model_validate(spec.options)
        except ValueError as exc:
            raise ConfigError(f"onnx engine options of {spec.name!r} are invalid: {exc}") from exc
        self._name = spec.name
        if spec.path is None or not spec.path.is_file():
            raise ConfigError(f"model {spec.name!r}: ONNX file {spec.path} not found; register it again")
        tokenizer_path = spec.extra_files.get("tokenizer")
        if tokenizer_path is None or not tokenizer_path.is_file():
            raise ConfigError(
                f"model {spec.name!r} has no tokenizer file ({tokenizer_path or 'none registered'}): "
                "register the model with --tokenizer PATH/tokenizer.json"
            )
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=self._options.max_length)
        self._pad_id = self._pad_token_id()
        self._session = self._open_session(str(spec.path))
        self._input_names = {i.name for i in self._session.get_inputs()}
        #: texts per pass: one where a text's vector would depend on the others (see the module doc)
        self._batch_size = 1 if quantizes_at_run_time(str(spec.path)) else self._options.batch_size
        on_cpu = self._session.get_providers()[0] == CPU_PROVIDER
        default_tokens = CPU_BATCH_TOKENS if on_cpu else GPU_BATCH_TOKENS
        self._batch_tokens = self._options.max_batch_tokens or default_tokens
        self._dim = self._embedding_dim()

    def _open_session(self, path: str) -> ort.InferenceSession:
        providers = choose_providers(self._options.providers, ort.get_available_providers())
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only: provider fallbacks are reported through info()
        # sized like llama.cpp's: ONNX Runtime's own default counts the machine's cores, not those this
        # process may use (a container pinned to some CPUs would spin more threads than it has)
        so.intra_op_num_threads = self._options.intra_op_threads or default_threads()
        try:
            return ort.InferenceSession(path, sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidGraph errors
            raise EngineError(
                f"ONNX Runtime could not load {path} ({exc}); check that it is a complete ONNX model"
            ) from exc

    def _pad_token_id(self) -> int:
        padding = self._tokenizer.padding
        if padding is not None:
            return int(padding["pad_id"])
        pad = self._tokenizer.token_to_id("[PAD]")
        return pad if pad is not None else 0

    def _embedding_dim(self) -> int:
        last = self._session.get_outputs()[0].shape[-1]
        if isinstance(last, int):
            return last
        return len(self.embed(["probe"]).vectors[0])

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine="onnx",
            capabilities=frozenset({Capability.EMBEDDING}),
            context_length=self._options.max_length,
            embedding_dim=self._dim,
            device=self._session.get_providers()[0],
            details={
                "providers": ",".join(self._session.get_providers()),
                "batch_size": str(self._batch_size),
                "max_batch_tokens": str(self._batch_tokens),
                "max_length": str(self._options.max_length),
                "threads": str(self._session.get_session_options().intra_op_num_threads),
            },
        )

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as the model sees it: special tokens included, truncated to max_length."""
        return len(self._tokenizer.encode(text).ids)

    def count_chat_tokens(self, messages: Sequence[ChatMessage]) -> int:
        raise self._unsupported("chat")

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Iterator[Delta]:
        raise self._unsupported("chat")

    def complete(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        raise self._unsupported("completion")

    def embed(self, texts: Sequence[str]) -> EmbeddingBatch:
        encodings = self._tokenizer.encode_batch(list(texts))
        out = np.empty((len(texts), 0), dtype=np.float32)
        lengths = [len(e.ids) for e in encodings]
        for batch in length_batches(lengths, self._batch_size, self._batch_tokens):
            vectors = self._forward([encodings[i] for i in batch])
            if out.shape[1] == 0:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[batch] = vectors
        return EmbeddingBatch(vectors=out.tolist(), prompt_tokens=sum(len(e.ids) for e in encodings))

    def close(self) -> None:
        """ONNX Runtime frees the session with the object."""

    def _forward(self, encodings: Sequence[Encoding]) -> FloatArray:
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[row, :n], mask[row, :n], types[row, :n] = enc.ids, enc.attention_mask, enc.type_ids
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feed["token_type_ids"] = types
        hidden = np.asarray(self._session.run(None, feed)[0], dtype=np.float32)
        return mean_pool(hidden, mask) if hidden.ndim == 3 else normalize(hidden)

    def _unsupported(self, what: str) -> UnsupportedCapabilityError:
        return UnsupportedCapabilityError(
            f"model {self._name!r} is an embedding model (ONNX): it can do embedding, not {what}; "
            "send it to /v1/embeddings or pick a chat model"
        )
