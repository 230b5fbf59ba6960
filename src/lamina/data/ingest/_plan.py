"""Planning a version: one file's pieces become kept documents and chunks, their texts in the spool.

A file is read as a stream of pieces (``_loaders``). Each document's hashes are taken piece by piece
(``DocumentHasher``), and its pieces are tokenised and cut into chunks in batches of at most
``segment_bytes`` of text, whose texts go to the spool at once; so what a file costs in memory is a
segment's worth of arrays plus a small record per chunk, whatever its size.

A document is de-duplicated when it ends (its hashes need all of it). A small one is still waiting in
the batch then, so a duplicate is dropped before it is tokenised; a large one may have had segments
chunked already, whose chunks are dropped with it. A chunk's id needs its document's hash, so chunks
become ``PlannedChunk`` s once their document has ended and its last piece has been chunked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from lamina.data.ingest._chunking import EmbeddingTokenizer, chunk_spans
from lamina.data.ingest._dedupe import DocumentHasher, StagedDeduplicator, content_sha256
from lamina.data.ingest._loaders import Piece
from lamina.data.ingest._records import KeptDocument, PlannedChunk, Skipped, SourceFile, SpoolSlice
from lamina.data.ingest._spool import Spool
from lamina.data.vectors import Scalar
from lamina.data.versions import SourceRecord, chunk_id

#: texts tokenised in one call, at most
_TOKENIZE_BATCH = 256


@dataclass
class Plan:
    """What a new version holds: its sources, the chunk ids reused whole with unchanged files, and the
    chunks planned from the files read."""

    sources: list[SourceRecord] = field(default_factory=list)
    reused_ids: list[str] = field(default_factory=list)
    planned: list[PlannedChunk] = field(default_factory=list)

    def chunk_ids(self) -> list[str]:
        return self.reused_ids + [p.chunk_id for p in self.planned]


@dataclass(frozen=True, slots=True)
class ChunkShape:
    """What cutting documents into chunks, and naming the chunks, depends on."""

    dataset: str
    pipeline: str
    embedder: EmbeddingTokenizer
    size: int
    overlap: int
    #: text queued for tokenising at most (about): the segment size
    batch_chars: int


@dataclass(frozen=True, slots=True)
class _Span:
    """A chunk of a document before the document's hash (and so the chunk's id) is known."""

    start: int
    end: int
    byte_start: int
    byte_end: int
    content_sha256: str
    text: SpoolSlice


@dataclass
class _OpenDocument:
    uri: str
    metadata: Mapping[str, Scalar]
    hasher: DocumentHasher = field(default_factory=DocumentHasher)
    #: characters of text so far (with joiners): where the next piece starts
    chars: int = 0
    spans: list[_Span] = field(default_factory=list)
    dropped: bool = False
    kept: KeptDocument | None = None


@dataclass(frozen=True, slots=True)
class _Queued:
    doc: _OpenDocument
    piece: Piece
    #: where the piece's text starts in its document's text
    base: int


class FileLoad:
    """One source file read into a run: documents de-duplicated, chunked and spooled as they come."""

    def __init__(
        self, file: SourceFile, sha256: str, shape: ChunkShape, dedupe: StagedDeduplicator, spool: Spool
    ) -> None:
        self.file = file
        self.sha256 = sha256
        self.dedupe = dedupe
        self.documents: list[KeptDocument] = []
        self.chunks: list[PlannedChunk] = []
        self.skipped: list[Skipped] = []
        self.duplicates = {"exact": 0, "near": 0}
        #: whether any document had text (a file without is unloadable, as before cleaning it was read)
        self.had_text = False
        self._shape = shape
        self._spool = spool
        self._open: _OpenDocument | None = None
        self._ended: list[_OpenDocument] = []
        self._queue: list[_Queued] = []
        self._queued_chars = 0

    def read(self, items: Iterable[Piece | Skipped]) -> None:
        """Take a file's pieces and skipped records, in order, to the end."""
        for item in items:
            if isinstance(item, Skipped):
                self.skipped.append(item)
                continue
            if item.first:
                self._end_document()
                self._open = _OpenDocument(item.uri, item.metadata)
            self._add(item)
        self._end_document()
        self._flush()

    def source(self) -> SourceRecord:
        return SourceRecord(
            uri=self.file.uri,
            sha256=self.sha256,
            size_bytes=self.file.size,
            mtime=self.file.mtime,
            documents=[d.as_triple() for d in self.documents],
            n_chunks=len(self.chunks),
        )

    def _add(self, piece: Piece) -> None:
        doc, text = self._open, piece.clean.text
        if doc is None or not text:
            return
        joiner = piece.joiner if doc.chars else ""
        doc.hasher.update(joiner + text)
        base = doc.chars + len(joiner)
        doc.chars = base + len(text)
        if self._queue and (
            len(self._queue) >= _TOKENIZE_BATCH or self._queued_chars + len(text) > self._shape.batch_chars
        ):
            self._flush()
        self._queue.append(_Queued(doc, piece, base))
        self._queued_chars += len(text)

    def _end_document(self) -> None:
        doc, self._open = self._open, None
        if doc is None or not doc.chars:
            return
        self.had_text = True
        hashed = doc.hasher.finish()
        dup = self.dedupe.duplicate_of(doc.uri, hashed.sha256, hashed.simhash)
        if dup is not None:
            self.skipped.append(Skipped(doc.uri, f"{dup.kind} duplicate of {dup.of}"))
            self.duplicates[dup.kind] += 1
            doc.dropped, doc.spans = True, []
            return
        self.dedupe.keep(doc.uri, hashed.sha256, hashed.simhash)
        doc.kept = KeptDocument(
            doc.uri, hashed.sha256, hashed.simhash, doc.metadata, self.file.uri, self.sha256
        )
        self.documents.append(doc.kept)
        self._ended.append(doc)

    def _flush(self) -> None:
        """Tokenise and chunk the queued pieces, spool the chunks' texts, name the ended documents' chunks."""
        batch = [q for q in self._queue if not q.doc.dropped]
        self._queue, self._queued_chars = [], 0
        shape = self._shape
        texts = [q.piece.clean.text for q in batch]
        cut = chunk_spans(texts, shape.embedder, shape.size, shape.overlap) if batch else []
        for q, spans in zip(batch, cut, strict=True):
            for span in spans:
                text = q.piece.clean.text[span.start : span.end]
                byte_start, byte_end = q.piece.clean.byte_span(span.start, span.end)
                q.doc.spans.append(
                    _Span(
                        q.base + span.start,
                        q.base + span.end,
                        byte_start,
                        byte_end,
                        content_sha256(text),
                        self._spool.write(text),
                    )
                )
        for doc in self._ended:
            self._name_chunks(doc)
        self._ended = []

    def _name_chunks(self, doc: _OpenDocument) -> None:
        kept, shape = doc.kept, self._shape
        if kept is None:
            return
        for s in doc.spans:
            cid = chunk_id(
                shape.dataset, kept.uri, kept.sha256, (s.start, s.end), shape.pipeline, shape.embedder.sha256
            )
            self.chunks.append(PlannedChunk(cid, kept, s.byte_start, s.byte_end, s.content_sha256, s.text))
        doc.spans = []
