"""A persistent, content-addressed, append-only store for item and user summaries.

One folder holds every summary that the item and user stages generate, plus small side
records: *refs* (a named pointer to a summary key, e.g. "item 42 -> key of its summary") and
*user states* (each user's chain of block-boundary summaries, for incremental updates).

Why JSONL segments rather than SQLite
-------------------------------------
Every writer process (a CLI run, one Dask worker) appends to its own segment file,
``segments/seg-<time>-<pid>-<uuid>.jsonl``. So no two processes ever write to the same file:
there is no lock to take, no lock to leak when a worker is killed, and nothing to corrupt on a
shared or network file system (where SQLite's WAL mode is unsafe, because it needs shared memory
between its writers). Each batch of records is written as complete lines in one ``write`` call,
then flushed and ``fsync``-ed before ``put`` returns. Each line carries a CRC of its content.

Readers merge all segments. A line without its newline (a write torn by ``kill -9`` or a power
loss) or with a wrong CRC is ignored. Records are deduplicated by key, so a summary written twice
by two racing workers counts once. A crash loses at most the batch being written; a re-run
generates exactly what is missing. A write that fails (a full disk) is cut back off the segment
and raised as an ``OSError`` naming the segment, with its errno (ENOSPC): earlier records stay
readable, and a re-run once there is space writes only what is missing. When two segments hold different texts for one key (possible
only with sampling, or a race between workers), the record of the lexicographically first
segment wins, so every reader agrees whatever the order it read the files in.

Data kept in memory: the index holds every summary text (a few hundred bytes each), so a store
of a million summaries takes about a gigabyte per process that opens it.

Usage::

    from merlin_mllm.summaries.store import SummaryStore

    store = SummaryStore("/data/summaries")
    key = SummaryStore.key("item", "smollm2-135m-instruct", "item-v1",
                           {"max_new_tokens": 96}, {"title": "Toy Story", "image": "sha256:..."})
    if key not in store:
        store.put(key, "A bright animated film ...", {"kind": "item", "item_id": 1})
    store.put_refs("item", {"1": key})   # item id -> its current summary
    store.get(store.get_ref("item", "1"))
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

#: Bump when the on-disk record layout changes.
STORE_FORMAT = 1
SEGMENT_DIR = "segments"
MARKER_FILE = "STORE.json"

#: The ref namespace in which item summaries are published: ``{str(item_id): summary_key}``.
ITEM_REF_NAMESPACE = "item"


@dataclass(frozen=True)
class SummaryRecord:
    """One stored summary."""

    key: str
    text: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class UserState:
    """Where a user's recurrent summary stands, under one configuration (``scope``).

    ``item_ids`` are all the user's item ids seen so far, in time order; ``boundaries`` are
    ``(n, key)`` pairs: the summary ``key`` covers exactly ``item_ids[:n]`` (n a multiple of the
    block size). Items after the last boundary are pending: they wait for a full block.
    """

    scope: str
    user_id: int
    item_ids: Tuple[int, ...]
    boundaries: Tuple[Tuple[int, str], ...]

    @property
    def summarised(self) -> int:
        """How many items the latest boundary summary covers."""
        return self.boundaries[-1][0] if self.boundaries else 0

    @property
    def latest_key(self) -> Optional[str]:
        return self.boundaries[-1][1] if self.boundaries else None

    @property
    def pending(self) -> Tuple[int, ...]:
        return self.item_ids[self.summarised :]


def canonical_json(value) -> str:
    """Stable JSON: sorted keys, no whitespace, NaN refused (it has no stable meaning)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_jsonable)


def _jsonable(value):
    # numpy scalars and arrays arrive from parquet columns
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable in a summary key: {type(value).__name__}")


def _store_error(exc: OSError, what: str, path: Path) -> OSError:
    """``exc`` again, with the same errno (ENOSPC stays ENOSPC), saying what failed and where."""
    reason = exc.strerror or str(exc)
    return OSError(exc.errno, f"{what} ({reason}); records written before are intact", str(path))


def _crc(*parts: str) -> int:
    crc = 0
    for part in parts:
        crc = zlib.crc32(part.encode("utf-8"), crc)
    return crc


class SummaryStore:
    """A folder of summaries shared by processes; see the module docstring for the design.

    Parameters
    ----------
    path : str or Path
        The store folder; created when missing.
    fsync : bool
        ``fsync`` every written batch (default). Turn off only for throwaway stores in tests of
        something else: without it a power loss may drop the last batches (never corrupt them).

    Example
    -------
    >>> store = SummaryStore(tmp_path / "store")
    >>> store.put(SummaryStore.key("user", "m", "v1", {}, {"items": [1, 2, 3]}), "The user ...")
    True
    """

    def __init__(self, path: Union[str, os.PathLike], *, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self._segments = self.path / SEGMENT_DIR
        self._segments.mkdir(parents=True, exist_ok=True)
        self._write_marker()
        self._lock = threading.RLock()
        self._summaries: Dict[str, Tuple[str, str, dict]] = {}  # key -> (segment name, text, meta)
        self._refs: Dict[Tuple[str, str], Tuple[Tuple[int, str], str]] = {}  # (ns, name) -> (order, key)
        self._states: Dict[Tuple[str, int], Tuple[tuple, UserState]] = {}
        self._offsets: Dict[str, int] = {}  # segment name -> bytes consumed
        self._writer = None
        self._writer_name: Optional[str] = None
        self._writer_pid: Optional[int] = None
        self._ref_seq = 0
        #: Complete lines that failed their CRC or JSON check (torn tails are not counted here).
        self.corrupt_lines = 0
        self.refresh()

    # ------------------------------------------------------------------ keys
    @staticmethod
    def key(kind: str, model_id: str, prompt_version: str, settings: Mapping, inputs: Mapping) -> str:
        """The content address of a summary: sha256 of the canonical JSON of everything that
        changes its text.

        Parameters
        ----------
        kind : str
            ``"item"``, ``"user_step"``, ... (different stages never share a key).
        model_id : str
            The generating model's id or path.
        prompt_version : str
            Bump it whenever a prompt's wording changes.
        settings : dict
            Output-relevant generation settings (``GenerationSettings.key()``).
        inputs : dict
            The exact inputs (texts, image hash, previous summary key, ...).
        """
        payload = {
            "kind": kind,
            "model_id": str(model_id),
            "prompt_version": str(prompt_version),
            "settings": dict(settings),
            "inputs": dict(inputs),
        }
        return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------ reading
    def refresh(self) -> int:
        """Read what other processes appended since the last call; return new summary count."""
        with self._lock:
            before = len(self._summaries)
            for segment in sorted(self._segments.glob("seg-*.jsonl")):
                self._read_segment(segment)
            return len(self._summaries) - before

    def _read_segment(self, segment: Path) -> None:
        name = segment.name
        offset = self._offsets.get(name, 0)
        with open(segment, "rb") as f:
            f.seek(offset)
            data = f.read()
        if not data:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return  # only a partial line: still being written, or torn by a crash
        for line in data[: end + 1].splitlines():
            if line.strip():
                self._apply_line(name, line)
        self._offsets[name] = offset + end + 1

    def _apply_line(self, segment: str, line: bytes) -> None:
        try:
            rec = json.loads(line)
            kind = rec["r"]
            if kind == "s":
                key, text, meta = rec["k"], rec["t"], rec.get("m") or {}
                if rec["c"] != _crc(key, text, canonical_json(meta)):
                    raise ValueError("crc mismatch")
                current = self._summaries.get(key)
                # Deterministic winner for a duplicated key: the first segment by name.
                if current is None or segment < current[0]:
                    self._summaries[key] = (segment, text, meta)
            elif kind == "ref":
                ns, name, key, order = rec["ns"], rec["n"], rec["k"], tuple(rec["o"])
                if rec["c"] != _crc(ns, name, key, canonical_json(list(order))):
                    raise ValueError("crc mismatch")
                current = self._refs.get((ns, name))
                order = (order[0], order[1], segment)
                if current is None or order > current[0]:
                    self._refs[(ns, name)] = (order, key)
            elif kind == "state":
                body = rec["b"]
                if rec["c"] != _crc(canonical_json(body)):
                    raise ValueError("crc mismatch")
                state = UserState(
                    scope=body["scope"],
                    user_id=int(body["user_id"]),
                    item_ids=tuple(int(i) for i in body["item_ids"]),
                    boundaries=tuple((int(n), str(k)) for n, k in body["boundaries"]),
                )
                self._offer_state(state, canonical_json(body))
            else:
                raise ValueError(f"unknown record type {kind!r}")
        except (ValueError, KeyError, TypeError):
            self.corrupt_lines += 1

    def _offer_state(self, state: UserState, body_json: str) -> None:
        # A user's history only grows, so the state covering the most items is the newest; the
        # tie-break on content makes every reader pick the same one whatever the read order.
        rank = (len(state.item_ids), len(state.boundaries), body_json)
        current = self._states.get((state.scope, state.user_id))
        if current is None or rank > current[0]:
            self._states[(state.scope, state.user_id)] = (rank, state)

    def __contains__(self, key: str) -> bool:
        return key in self._summaries

    def __len__(self) -> int:
        return len(self._summaries)

    def __iter__(self) -> Iterator[SummaryRecord]:
        with self._lock:
            items = list(self._summaries.items())
        for key, (_, text, meta) in items:
            yield SummaryRecord(key, text, dict(meta))

    def get(self, key: Optional[str], default: Optional[str] = None) -> Optional[str]:
        """The summary text stored under ``key``, or ``default``."""
        found = self._summaries.get(key) if key is not None else None
        return found[1] if found is not None else default

    def get_record(self, key: str) -> Optional[SummaryRecord]:
        found = self._summaries.get(key)
        return SummaryRecord(key, found[1], dict(found[2])) if found is not None else None

    def get_many(self, keys: Iterable[str]) -> Dict[str, str]:
        """``{key: text}`` for the keys present (missing keys are left out)."""
        out = {}
        for key in keys:
            found = self._summaries.get(key)
            if found is not None:
                out[key] = found[1]
        return out

    # ------------------------------------------------------------------ writing
    def put(self, key: str, text: str, meta: Optional[Mapping] = None) -> bool:
        """Store one summary durably. Returns False (and writes nothing) if the key exists."""
        return self.put_many([(key, text, meta)]) == 1

    def put_many(self, records: Iterable[Tuple[str, str, Optional[Mapping]]]) -> int:
        """Store ``(key, text, meta)`` records in one durable write; return how many were new.

        Keys already in the store (or repeated in ``records``) are skipped.
        """
        lines: List[bytes] = []
        with self._lock:
            fresh: Dict[str, Tuple[str, dict]] = {}
            for key, text, meta in records:
                if not isinstance(key, str) or not isinstance(text, str):
                    raise TypeError(f"a summary needs a str key and str text, got {type(key).__name__}/{type(text).__name__}")
                if key in self._summaries or key in fresh:
                    continue
                meta = dict(meta or {})
                meta_json = canonical_json(meta)
                fresh[key] = (text, meta)
                rec = {"r": "s", "k": key, "t": text, "m": meta, "c": _crc(key, text, meta_json)}
                lines.append(canonical_json(rec).encode("utf-8") + b"\n")
            if not lines:
                return 0
            segment = self._append(lines)
            for key, (text, meta) in fresh.items():
                self._summaries[key] = (segment, text, meta)
            return len(fresh)

    def _append(self, lines: Sequence[bytes]) -> str:
        """Append complete lines to this process's own segment in one write, durably.

        All or nothing: when the write or its fsync fails (a full disk: ENOSPC), the segment is
        cut back to its size before the batch, so no record of the batch is left half written,
        and this store starts a new segment at its next write. Records written before stay
        readable. The OSError raised names the segment and keeps its errno.
        """
        if self._writer is None or self._writer_pid != os.getpid():
            # A new process (also a forked child holding the parent's store) gets its own file.
            name = f"seg-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl"
            path = self._segments / name
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o644)
            except OSError as exc:
                raise _store_error(exc, "cannot create summary store segment", path) from exc
            self._writer = os.fdopen(fd, "ab", buffering=0)
            self._writer_name, self._writer_pid = name, os.getpid()
            self._fsync_dir()
        payload = b"".join(lines)
        fd = self._writer.fileno()
        start = os.fstat(fd).st_size  # one writer per segment: this is where the batch begins
        try:
            view = memoryview(payload)
            while view:
                # A short write (the disk filled part way) is followed by another write, which
                # then reports the error itself (ENOSPC).
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(errno.EIO, f"write returned {written}")
                view = view[written:]
            if self.fsync:
                os.fsync(fd)
        except OSError as exc:
            self._abandon_segment(start)
            raise _store_error(exc, f"cannot append {len(lines)} record(s) to summary store segment",
                               self._segments / self._writer_name if self._writer_name else self._segments) from exc
        # Our own bytes are in the index already: skip them on the next refresh.
        end = start + len(payload)
        if self._offsets.get(self._writer_name, 0) == start:
            self._offsets[self._writer_name] = end
        return self._writer_name

    def _abandon_segment(self, size: int) -> None:
        """After a failed write: cut the segment back to ``size`` and stop writing to it."""
        try:
            os.ftruncate(self._writer.fileno(), size)
        except OSError:
            pass  # a torn tail has no newline: readers ignore it, and nothing follows it
        try:
            self._writer.close()
        except OSError:
            pass
        # The next write opens a new segment, so nothing is ever appended after a torn tail.
        self._writer = None

    def _fsync_dir(self) -> None:
        if not self.fsync:
            return
        try:
            fd = os.open(self._segments, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass  # some file systems refuse fsync on directories
        finally:
            os.close(fd)

    def _write_marker(self) -> None:
        marker = self.path / MARKER_FILE
        if marker.exists():
            try:
                found = json.loads(marker.read_text()).get("format")
            except ValueError:
                found = None
            if found not in (None, STORE_FORMAT):
                raise ValueError(f"{self.path} holds a summary store of format {found}; this code reads format {STORE_FORMAT}")
            return
        tmp = self.path / f".{MARKER_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            tmp.write_text(json.dumps({"format": STORE_FORMAT, "kind": "merlin-mllm summary store"}) + "\n")
            os.replace(tmp, marker)  # atomic: concurrent creators write the same content
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _store_error(exc, "cannot write the summary store marker", marker) from exc

    def close(self) -> None:
        with self._lock:
            if self._writer is not None and self._writer_pid == os.getpid():
                self._writer.close()
            self._writer = None

    def __enter__(self) -> "SummaryStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        raise TypeError("SummaryStore is not picklable; pass its path and open it in each process (open_store)")

    def __repr__(self) -> str:
        return f"SummaryStore({str(self.path)!r}, summaries={len(self)})"

    # ------------------------------------------------------------------ refs
    def put_refs(self, namespace: str, mapping: Mapping[str, str]) -> int:
        """Point names at summary keys (the latest write of a name wins). Returns refs written.

        Refs already pointing at the same key are not rewritten.
        """
        lines = []
        with self._lock:
            for name, key in mapping.items():
                name = str(name)
                current = self._refs.get((namespace, name))
                if current is not None and current[1] == key:
                    continue
                self._ref_seq += 1
                order = [time.time_ns(), self._ref_seq]
                rec = {"r": "ref", "ns": namespace, "n": name, "k": key, "o": order,
                       "c": _crc(namespace, name, key, canonical_json(order))}
                lines.append((name, key, order, canonical_json(rec).encode("utf-8") + b"\n"))
            if not lines:
                return 0
            segment = self._append([line for *_, line in lines])
            for name, key, order, _ in lines:
                self._refs[(namespace, name)] = ((order[0], order[1], segment), key)
            return len(lines)

    def get_ref(self, namespace: str, name) -> Optional[str]:
        found = self._refs.get((namespace, str(name)))
        return found[1] if found is not None else None

    def get_refs(self, namespace: str, names: Optional[Iterable] = None) -> Dict[str, str]:
        """``{name: key}`` of a namespace (all names, or the given ones that exist)."""
        if names is None:
            return {n: v[1] for (ns, n), v in list(self._refs.items()) if ns == namespace}
        out = {}
        for name in names:
            found = self._refs.get((namespace, str(name)))
            if found is not None:
                out[str(name)] = found[1]
        return out

    # ------------------------------------------------------------------ user states
    def put_user_states(self, states: Iterable[UserState]) -> int:
        """Record users' block-boundary chains durably; states equal to the known ones are skipped."""
        lines, accepted = [], []
        with self._lock:
            for state in states:
                current = self._states.get((state.scope, state.user_id))
                if current is not None and current[1] == state:
                    continue
                body = {
                    "scope": state.scope,
                    "user_id": int(state.user_id),
                    "item_ids": [int(i) for i in state.item_ids],
                    "boundaries": [[int(n), str(k)] for n, k in state.boundaries],
                }
                body_json = canonical_json(body)
                rec = {"r": "state", "b": body, "c": _crc(body_json)}
                lines.append(canonical_json(rec).encode("utf-8") + b"\n")
                accepted.append((state, body_json))
            if not lines:
                return 0
            self._append(lines)
            for state, body_json in accepted:
                self._offer_state(state, body_json)
            return len(lines)

    def get_user_state(self, scope: str, user_id: int) -> Optional[UserState]:
        found = self._states.get((scope, int(user_id)))
        return found[1] if found is not None else None

    def user_states(self, scope: Optional[str] = None) -> Dict[Tuple[str, int], UserState]:
        """Every user's current state, keyed by ``(scope, user_id)``."""
        return {k: v[1] for k, v in list(self._states.items()) if scope is None or k[0] == scope}


# One store object per (process, path): a process writes one segment, however many partitions
# or calls it handles.
_OPEN_STORES: Dict[Tuple[int, str], SummaryStore] = {}
_OPEN_LOCK = threading.Lock()


def open_store(path: Union[str, os.PathLike, SummaryStore], *, refresh: bool = True) -> SummaryStore:
    """The process-wide store for ``path`` (opened once per process), refreshed by default."""
    if isinstance(path, SummaryStore):
        if refresh:
            path.refresh()
        return path
    resolved = str(Path(path).resolve())
    with _OPEN_LOCK:
        store = _OPEN_STORES.get((os.getpid(), resolved))
        if store is None:
            store = _OPEN_STORES[(os.getpid(), resolved)] = SummaryStore(resolved)
            return store
    if refresh:
        store.refresh()
    return store
