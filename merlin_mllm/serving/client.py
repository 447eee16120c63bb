"""A small client for the served ranker (``merlin-mllm export`` + ``merlin-mllm serve``).

It sends one user and their candidate item ids to the ``mllm_rerank`` ensemble over gRPC
(default) or HTTP, and returns the candidates ranked by P(yes) plus every score in input order.
See ``triton_repo/README.md`` for the tensors on the wire.

Usage::

    from merlin_mllm.serving.client import RerankClient

    with RerankClient("localhost:8001") as client:          # protocol="http" -> localhost:8000
        result = client.rank(user_id=7, item_ids=[12, 40, 3], top_k=2)
    result.ranked        # [(40, 0.61), (12, 0.47)]
    result.scores        # array([0.47, 0.61, 0.22], dtype=float32), input order
    result.known_user    # True; False: a cold start, scored with the empty-history summary

    # a hybrid export: the retrieval stage's score of each candidate travels with it
    client.rank(user_id=7, item_ids=[12, 40, 3], retrieval_scores=[2.1, 0.4, -1.3])

    # or in one call
    from merlin_mllm.serving.client import rank
    rank(7, [12, 40, 3], top_k=2).ranked
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from merlin_mllm.choices import SERVER_PROTOCOLS
from merlin_mllm.serving.steps import ENSEMBLE_MODEL, RETRIEVAL_INPUT

__all__ = ["RerankClient", "RankResult", "RerankError", "rank", "DEFAULT_URLS"]

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}


class RerankError(ValueError):
    """The server rejected a request, or could not be reached; the message says which and why."""


@dataclass
class RankResult:
    """One user's answer.

    Attributes
    ----------
    user_id : int
    item_ids : np.ndarray (int64)
        The candidates, as sent.
    scores : np.ndarray (float32)
        P(yes) for each candidate, in the order sent.
    ranked : list of (item_id, score)
        The best ``top_k`` candidates, highest score first.
    known_user : bool or None
        Whether the export had a summary for this user; False is a cold start (scored with the
        generic empty-history summary). None from an export older than the ``known_user`` output.
    """

    user_id: int
    item_ids: np.ndarray
    scores: np.ndarray
    ranked: List[Tuple[int, float]]
    known_user: Optional[bool] = None


def _as_retrieval_scores(scores: Sequence, items: np.ndarray) -> np.ndarray:
    values = list(scores)
    if len(values) != len(items):
        raise RerankError(f"retrieval_scores has {len(values)} scores for {len(items)} item ids: "
                          "send one score per candidate, in the order of item_ids")
    for position, value in enumerate(values):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(float(value)):
            raise RerankError(f"retrieval score at position {position} (item {int(items[position])}) is {value!r}, "
                              "not a finite number")
    return np.asarray(values, dtype=np.float32)


def _as_item_ids(item_ids: Sequence) -> np.ndarray:
    values = list(item_ids)
    for position, value in enumerate(values):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise RerankError(f"item id at position {position} is {value!r}, not an integer")
    return np.asarray(values, dtype=np.int64)


class RerankClient:
    """Client of the ``mllm_rerank`` ensemble.

    Parameters
    ----------
    url : str, optional
        ``host:port``; default ``localhost:8001`` (gRPC) or ``localhost:8000`` (HTTP).
    protocol : {"grpc", "http"}
    model_name : str
        The ensemble's name (``mllm_rerank``).
    timeout : float, optional
        Seconds to wait for one answer (None: no limit; CPU scoring of 20 candidates takes ~1 s).
    """

    def __init__(self, url: Optional[str] = None, protocol: str = "grpc", model_name: str = ENSEMBLE_MODEL,
                 timeout: Optional[float] = None):
        if protocol not in SERVER_PROTOCOLS:
            raise RerankError(f"protocol must be one of {SERVER_PROTOCOLS}, not {protocol!r}")
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.model_name = model_name
        self.timeout = timeout
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Only the chosen protocol's client is imported (grpcio or the HTTP stack): a heavy
            # import that the other protocol never needs.
            if protocol == "grpc":
                import tritonclient.grpc as module
            else:
                import tritonclient.http as module
        self._module = module
        try:
            if protocol == "grpc":
                self._client = module.InferenceServerClient(self.url)
            else:
                kwargs = {} if timeout is None else {"connection_timeout": timeout, "network_timeout": timeout}
                self._client = module.InferenceServerClient(self.url, **kwargs)
        except Exception as exc:
            raise RerankError(f"cannot create a {protocol} client for {self.url}: {exc}") from exc

    def _error(self, exc) -> RerankError:
        message = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
        status = str(exc.status()) if hasattr(exc, "status") and callable(exc.status) else ""
        if "UNAVAILABLE" in status or "onnect" in (message or ""):
            return RerankError(
                f"cannot reach Triton at {self.url} over {self.protocol} ({message}); is `merlin-mllm serve` running?"
            )
        return RerankError(f"{self.model_name} at {self.url}: {message}")

    def is_ready(self) -> bool:
        """Whether the server answers and the ensemble is loaded."""
        try:
            return bool(self._client.is_server_ready()) and bool(self._client.is_model_ready(self.model_name))
        except Exception:
            return False

    def _input(self, name: str, array: np.ndarray, dtype: str):
        tensor = self._module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        return tensor

    def rank(self, user_id: int, item_ids: Sequence[int], top_k: Optional[int] = None,
             retrieval_scores: Optional[Sequence[float]] = None) -> RankResult:
        """Score ``item_ids`` for ``user_id``; the server's default top_k applies when None.

        ``retrieval_scores``: the retrieval stage's score of each candidate (in the order of
        ``item_ids``), which a hybrid export's head reads as ``retrieval_score``; a hybrid that
        needs them rejects a request without them.
        """
        items = _as_item_ids(item_ids)
        inputs = [
            self._input("user_id", np.array([[int(user_id)]], dtype=np.int64), "INT64"),
            self._input("item_ids", items.reshape(1, -1), "INT64"),
        ]
        if top_k is not None:
            inputs.append(self._input("top_k", np.array([[int(top_k)]], dtype=np.int32), "INT32"))
        if retrieval_scores is not None:
            scores = _as_retrieval_scores(retrieval_scores, items)
            inputs.append(self._input(RETRIEVAL_INPUT, scores.reshape(1, -1), "FP32"))
        kwargs = {"client_timeout": self.timeout} if self.protocol == "grpc" and self.timeout else {}
        try:
            # No output list: the server returns every output, so an export older than the
            # known_user output still answers (known_user is then None).
            answer = self._client.infer(self.model_name, inputs, **kwargs)
        except Exception as exc:
            raise self._error(exc) from exc
        scores = answer.as_numpy("scores").reshape(-1)
        ranked_ids = answer.as_numpy("ranked_item_ids").reshape(-1)
        ranked_scores = answer.as_numpy("ranked_scores").reshape(-1)
        ranked = [(int(i), float(s)) for i, s in zip(ranked_ids, ranked_scores)]
        known = answer.as_numpy("known_user")
        return RankResult(int(user_id), items, scores, ranked, None if known is None else bool(known.reshape(-1)[0]))

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:
            pass

    def __enter__(self) -> "RerankClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rank(user_id: int, item_ids: Sequence[int], top_k: Optional[int] = None, *, url: Optional[str] = None,
         protocol: str = "grpc", model_name: str = ENSEMBLE_MODEL, timeout: Optional[float] = None,
         retrieval_scores: Optional[Sequence[float]] = None) -> RankResult:
    """One request with a short-lived :class:`RerankClient` (see its parameters)."""
    with RerankClient(url, protocol=protocol, model_name=model_name, timeout=timeout) as client:
        return client.rank(user_id, item_ids, top_k, retrieval_scores=retrieval_scores)
