"""Retrieval of similar subjects: a FAISS index over volume embeddings, queried by ID or new scan.

Example:
    >>> from slice2vol.retrieval import Index, IndexConfig
    >>> index = Index.from_store("ixi.h5", "mean", config=IndexConfig(kind="flat"))
    >>> index.save("ixi-index")
    >>> Index.load("ixi-index").search_subject("IXI039-HH-1261", k=5)
    >>> Index.load("ixi-index").search_nifti("new_T1.nii.gz", k=5)
"""

from slice2vol.retrieval.index import (
    Index,
    IndexConfig,
    ProvenanceError,
    normalize_rows,
    recall_at_k,
)

__all__ = ["Index", "IndexConfig", "ProvenanceError", "normalize_rows", "recall_at_k"]
