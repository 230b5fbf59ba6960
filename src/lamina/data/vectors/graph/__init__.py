"""The graph index: an in-process HNSW graph (FAISS), BM25 postings and rows beside a store's table.

``GraphFiles`` builds, publishes and loads the builds of one store (``_files``); ``Graph`` is one loaded
build and how a query searches it (``_search``); ``_build`` writes builds, fresh or extending the last.
"""

from lamina.data.vectors.graph._files import GraphFiles, GraphView
from lamina.data.vectors.graph._search import ROW_SCHEMA, Graph

__all__ = ["ROW_SCHEMA", "Graph", "GraphFiles", "GraphView"]
