"""The models layer's embedders for the data layer: a registered model in process, or a running stack.

Both implement the data layer's ``Embedder`` (vectors, ``name@version`` and the file's sha256 for lineage)
and ``ChunkTokenizer`` (token offsets for chunking), with the model's own tokenizer file from the
registry. The tokenizer for chunking is a second copy without truncation or padding: chunking must see
every token of a document, while the engine truncates to what the model accepts.

Files are hashed again before they are loaded, as the replica worker does: a tokenizer, model file or
external-data file whose sha256 no longer matches the registry's record is a ChecksumMismatchError.

``EngineEmbedder`` runs the ONNX engine in this process: what every ``lamina data`` command uses, so
ingestion works whether or not a stack is up. ``HTTPEmbedder`` sends texts to a running stack's
``/v1/embeddings`` instead, where a replica already holds the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx
from tokenizers import Tokenizer

from lamina.errors import ConfigError, EngineError, UnavailableError, from_body
from lamina.models._builtin_engines import ONNXOptions
from lamina.models._checksums import check_files, remedy_for
from lamina.models._engine import LoadSpec
from lamina.models._model_version import ModelVersion
from lamina.models._onnx import ONNXEngine
from lamina.models._registry import Registry


class _Tokens:
    """A model's tokenizer, untruncated and unpadded, for counting and chunking."""

    def __init__(self, mv: ModelVersion, max_length: int) -> None:
        path = mv.extra_files.get("tokenizer")
        if path is None or not path.is_file():
            raise ConfigError(
                f"model {mv.ref} has no tokenizer file; register it with --tokenizer PATH/tokenizer.json"
            )
        check_files([mv.companion("tokenizer")], mv.ref, remedy_for(mv.ref))
        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        processor = self._tokenizer.post_processor
        specials = processor.num_special_tokens_to_add(False) if processor is not None else 0
        self.max_tokens = max_length - specials

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text).ids)

    def offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [[(int(a), int(b)) for a, b in enc.offsets] for enc in encodings]


class _RegisteredEmbedder:
    """What both embedders take from the registered model: its identity and its tokenizer."""

    def __init__(self, mv: ModelVersion, max_length: int) -> None:
        self._mv = mv
        self._tokens = _Tokens(mv, max_length)

    @property
    def name(self) -> str:
        return self._mv.ref

    @property
    def sha256(self) -> str:
        return self._mv.sha256

    @property
    def max_tokens(self) -> int:
        return self._tokens.max_tokens

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` including special tokens, not truncated."""
        return self._tokens.count(text)

    def token_offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        return self._tokens.offsets(texts)


class EngineEmbedder(_RegisteredEmbedder):
    """A registered ONNX embedding model run in this process."""

    def __init__(self, mv: ModelVersion, options: ONNXOptions | None = None) -> None:
        if mv.format != "onnx":
            raise ConfigError(
                f"model {mv.ref} is {mv.format}, not an ONNX embedding model; set data.embedding_model to "
                "one (the bundled one is minilm-l6-v2)"
            )
        self._options = options or ONNXOptions()
        super().__init__(mv, self._options.max_length)  # checks the tokenizer
        check_files([f for f in mv.files() if f.role != "tokenizer"], mv.ref, remedy_for(mv.ref))
        spec = LoadSpec(
            name=mv.ref, path=mv.path, extra_files=mv.extra_files, options=self._options.model_dump()
        )
        self._engine = ONNXEngine(spec)
        self._dim = self._engine.info().embedding_dim or 0

    @classmethod
    def from_registry(
        cls, registry: Registry, ref: str, options: ONNXOptions | None = None
    ) -> EngineEmbedder:
        return cls(registry.get(ref), options)

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit vectors, batched by the engine (``ONNXOptions.batch_size`` texts per forward pass)."""
        if not texts:
            return []
        return self._engine.embed(texts).vectors

    def close(self) -> None:
        self._engine.close()


class HTTPEmbedder(_RegisteredEmbedder):
    """A running stack's ``/v1/embeddings``; ``served_name`` is the deployment serving ``mv``."""

    def __init__(
        self,
        base_url: str,
        served_name: str,
        mv: ModelVersion,
        *,
        client: httpx.Client | None = None,
        api_key: str | None = None,
        max_length: int = ONNXOptions().max_length,
    ) -> None:
        super().__init__(mv, max_length)
        self._url = base_url.rstrip("/") + "/embeddings"
        self._served = served_name
        self._client = client or httpx.Client(timeout=httpx.Timeout(300.0, connect=5.0))
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = len(self.embed(["probe"])[0])
        return self._dim

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        try:
            response = self._client.post(
                self._url, json={"model": self._served, "input": list(texts)}, headers=self._headers
            )
        except httpx.HTTPError as exc:
            raise UnavailableError(
                f"cannot reach the stack at {self._url} ({exc}); start it with `lamina up` or drop --gateway"
            ) from exc
        if response.status_code != 200:
            raise from_body(response.status_code, _json_or_empty(response))
        data = sorted(response.json()["data"], key=lambda item: item["index"])
        vectors = [[float(x) for x in item["embedding"]] for item in data]
        if len(vectors) != len(texts):
            raise EngineError(f"{self._url} returned {len(vectors)} embeddings for {len(texts)} texts")
        return vectors

    def close(self) -> None:
        self._client.close()


def _json_or_empty(response: httpx.Response) -> dict[str, object]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
