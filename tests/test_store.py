"""The summary store: content keys, durability, concurrent writers, torn lines, a full disk, kill -9 and resume."""
from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from merlin_mllm.summaries.report import SummaryReport
from merlin_mllm.summaries.store import SummaryStore, UserState


def _records(folder: Path):
    """Every complete summary line of every segment, as (key, text) pairs (duplicates kept)."""
    out = []
    for seg in sorted((folder / "segments").glob("seg-*.jsonl")):
        for line in seg.read_bytes().split(b"\n"):
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("r") == "s":
                    out.append((rec["k"], rec["t"]))
    return out


def test_key_is_canonical_and_covers_every_field():
    base = dict(kind="item", model_id="m", prompt_version="v1", settings={"a": 1, "b": 2}, inputs={"t": "x", "n": [1, 2]})
    key = SummaryStore.key(**base)
    assert len(key) == 64 and int(key, 16) >= 0
    # Dict order does not matter...
    assert SummaryStore.key("item", "m", "v1", {"b": 2, "a": 1}, {"n": [1, 2], "t": "x"}) == key
    # ...every field does.
    for field, value in [("kind", "user"), ("model_id", "m2"), ("prompt_version", "v2"),
                         ("settings", {"a": 1, "b": 3}), ("inputs", {"t": "x", "n": [2, 1]})]:
        assert SummaryStore.key(**dict(base, **{field: value})) != key, field


def test_put_get_persist_and_iterate(tmp_path):
    store = SummaryStore(tmp_path / "s")
    keys = [SummaryStore.key("item", "m", "v1", {}, {"i": i}) for i in range(5)]
    assert store.put(keys[0], "zero", {"item_id": 0}) is True
    assert store.put(keys[0], "other text") is False  # content-addressed: first write stays
    assert store.put_many([(k, f"text {i}", {"i": i}) for i, k in enumerate(keys)] + [(keys[1], "dup", None)]) == 4
    assert len(store) == 5 and keys[3] in store and "nope" not in store
    assert store.get(keys[0]) == "zero" and store.get("nope") is None
    assert store.get_many([keys[2], "nope"]) == {keys[2]: "text 2"}

    reopened = SummaryStore(tmp_path / "s")
    assert {r.key: r.text for r in reopened} == {keys[0]: "zero", **{k: f"text {i}" for i, k in enumerate(keys) if i}}
    assert reopened.get_record(keys[0]).meta == {"item_id": 0}
    with pytest.raises(TypeError, match="str key and str text"):
        store.put(keys[0], None)


def _writer(path: str, worker: int, n: int, shared: int, barrier) -> None:
    store = SummaryStore(path)
    barrier.wait()  # all processes write at the same time
    for i in range(n):
        # The first `shared` keys are written by every process (a race for the same summary).
        tag = f"shared-{i}" if i < shared else f"w{worker}-{i}"
        store.put_many([(SummaryStore.key("t", "m", "v", {}, {"tag": tag}), f"text {tag}", {"w": worker})])
    store.put_refs("item", {str(worker): SummaryStore.key("t", "m", "v", {}, {"tag": f"w{worker}-{n - 1}"})})


def test_concurrent_writers_lose_and_duplicate_nothing(tmp_path):
    n_procs, n, shared = 4, 60, 20
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(n_procs)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "s"), w, n, shared, barrier)) for w in range(n_procs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = SummaryStore(tmp_path / "s")
    expected = {f"shared-{i}" for i in range(shared)} | {f"w{w}-{i}" for w in range(n_procs) for i in range(shared, n)}
    assert len(store) == len(expected)
    assert sorted(r.text for r in store) == sorted(f"text {t}" for t in expected)
    assert store.corrupt_lines == 0
    # One segment per writer process; raced keys may be written more than once on disk but read once.
    assert len(list((tmp_path / "s" / "segments").glob("seg-*.jsonl"))) == n_procs
    raw = _records(tmp_path / "s")
    assert len({k for k, _ in raw}) == len(expected) and len(raw) >= len(expected)
    assert store.get_refs("item") == {str(w): SummaryStore.key("t", "m", "v", {}, {"tag": f"w{w}-{n - 1}"}) for w in range(n_procs)}


def test_forked_child_writes_its_own_segment(tmp_path):
    store = SummaryStore(tmp_path / "s")
    store.put("k-parent", "parent")
    pid = os.fork()
    if pid == 0:  # child: same object, inherited file handle
        try:
            store.put("k-child", "child")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert len(list((tmp_path / "s" / "segments").glob("seg-*.jsonl"))) == 2
    store.refresh()
    assert store.get("k-child") == "child" and store.get("k-parent") == "parent"


def test_torn_last_line_and_corrupt_line_are_ignored(tmp_path):
    store = SummaryStore(tmp_path / "s")
    store.put_many([(f"k{i}", f"text {i}", {}) for i in range(3)])
    store.close()
    segment = next((tmp_path / "s" / "segments").glob("seg-*.jsonl"))
    complete = segment.read_bytes()
    # A crash in the middle of a write leaves a line without its end.
    full_line = json.dumps({"r": "s", "k": "k3", "t": "text 3", "m": {}, "c": 0}).encode()
    with open(segment, "ab") as f:
        f.write(full_line[: len(full_line) // 2])
    torn = SummaryStore(tmp_path / "s")
    assert len(torn) == 3 and "k3" not in torn and torn.corrupt_lines == 0
    # A complete line whose CRC does not match its content is refused and counted.
    bad = tmp_path / "s" / "segments" / "seg-00000000000000000000-1-bad.jsonl"
    line = json.loads(complete.split(b"\n")[0])
    line["t"] = "tampered"
    bad.write_bytes(json.dumps(line).encode() + b"\n")
    checked = SummaryStore(tmp_path / "s")
    assert checked.get("k0") == "text 0" and checked.corrupt_lines == 1
    # Writing goes on in a new segment; the torn one stays ignored.
    checked.put("k4", "text 4")
    assert SummaryStore(tmp_path / "s").get_many(["k0", "k3", "k4"]) == {"k0": "text 0", "k4": "text 4"}


def test_refs_latest_wins_and_user_state_longest_wins(tmp_path):
    store = SummaryStore(tmp_path / "s")
    store.put_refs("item", {"1": "a"})
    store.put_refs("item", {"1": "b", "2": "c"})
    assert store.put_refs("item", {"1": "b"}) == 0  # unchanged: nothing written
    short = UserState("scope", 7, (1, 2, 3, 4), ((3, "k1"),))
    longer = UserState("scope", 7, (1, 2, 3, 4, 5, 6), ((3, "k1"), (6, "k2")))
    other = SummaryStore(tmp_path / "s")
    other.put_user_states([longer])
    store.put_user_states([short])  # written later, but covers fewer items
    for reader in (SummaryStore(tmp_path / "s"), store):
        reader.refresh()
        assert reader.get_refs("item", ["1", "2", "3"]) == {"1": "b", "2": "c"}
        state = reader.get_user_state("scope", 7)
        assert state == longer and state.pending == () and state.latest_key == "k2"
    assert store.get_user_state("other-scope", 7) is None


def test_report_merge_and_str():
    a = SummaryReport(generated=2, llm_calls=2, new_tokens=30, items_without_summary=1)
    a.add_error("row 3: boom")
    b = SummaryReport(reused_from_store=5, missing_images=1)
    merged = SummaryReport().merge(a).merge(b)
    assert merged.to_dict()["reused_from_store"] == 5 and merged.failed == 1 and merged.errors == ["row 3: boom"]
    assert SummaryReport.from_dict(merged.to_dict()) == merged
    assert str(merged).startswith("generated 2, reused 5, failed 1, skipped 0, LLM calls 2, tokens 30")
    assert "\n" not in str(merged)


# --------------------------------------------------------------------------- disk full
def _batch(start, stop, size=200):
    # Texts of a few hundred bytes, like real summaries.
    return [(SummaryStore.key("item", "m", "v1", {}, {"i": i}), f"summary {i} " + "x" * size, {"item_id": i})
            for i in range(start, stop)]


class _FullDisk:
    """os.write for the store's segments: the disk fills part way through one write.

    That write stores half its bytes and returns short, as the kernel does when the disk fills
    mid-way; every later write to a segment fails with ENOSPC. Other files are written normally.
    """

    def __init__(self, segments: Path, real_write):
        self.segments, self.real_write, self.full, self.calls = str(segments), real_write, False, 0

    def __call__(self, fd, data):
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(self.segments + os.sep):
            return self.real_write(fd, data)
        self.calls += 1
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.full = True
        return self.real_write(fd, bytes(data)[: len(data) // 2])


def test_disk_full_names_the_segment_keeps_earlier_records_and_a_rerun_completes(tmp_path, monkeypatch):
    root = tmp_path / "s"
    store = SummaryStore(root)
    first, second = _batch(0, 5), _batch(5, 10)
    assert store.put_many(first) == 5
    store.put_refs("item", {"0": first[0][0]})

    disk = _FullDisk(root / "segments", os.write)
    monkeypatch.setattr(os, "write", disk)
    with pytest.raises(OSError) as info:
        store.put_many(second)
    assert info.value.errno == errno.ENOSPC and disk.calls == 2  # the short write, then ENOSPC
    segment = Path(info.value.filename)
    assert segment.parent == root / "segments" and segment.name.startswith("seg-")
    assert str(segment) in str(info.value) and "No space left on device" in str(info.value)
    assert "cannot append 5 record(s)" in str(info.value)
    # Nothing of the failed batch is taken as stored, and later writes fail the same clear way.
    assert all(key not in store for key, _, _ in second) and len(store) == 5
    for attempt in (lambda: store.put_many(second[:1]), lambda: store.put_refs("item", {"5": second[0][0]}),
                    lambda: store.put_user_states([UserState("sc", 1, (1, 2), ((2, first[1][0]),))])):
        with pytest.raises(OSError, match="No space left on device") as info:
            attempt()
        assert str(root / "segments") in str(info.value.filename)

    # Every record written before the disk filled reads back, with no torn or corrupt line.
    reopened = SummaryStore(root)
    assert {r.key: r.text for r in reopened} == {key: text for key, text, _ in first}
    assert reopened.get_ref("item", "0") == first[0][0] and reopened.get_ref("item", "5") is None
    assert reopened.user_states() == {} and reopened.corrupt_lines == 0
    assert all(seg.read_bytes()[-1:] in (b"", b"\n") for seg in (root / "segments").glob("seg-*.jsonl"))

    # Space again: the same store object writes on (in a new segment), then a rerun (a fresh
    # store, as a new process opens it) completes the store, each record once.
    monkeypatch.setattr(os, "write", disk.real_write)
    assert store.put_many(first + second[:2]) == 2
    assert SummaryStore(root).put_many(first + second) == 3
    done = SummaryStore(root)
    assert {r.key: r.text for r in done} == {key: text for key, text, _ in first + second}
    raw = [key for key, _ in _records(root)]
    assert sorted(raw) == sorted(key for key, _, _ in first + second)  # no duplicates
    assert done.corrupt_lines == 0


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 64 KiB tmpfs, where the kernel really runs out of space; skipped where mounting is not allowed."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip() or made.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_on_a_real_tiny_filesystem(tiny_filesystem):
    root = tiny_filesystem / "s"
    store = SummaryStore(root, fsync=True)
    records = _batch(0, 400, size=400)  # about 200 KB: three times what fits
    written, failure = 0, None
    for start in range(0, len(records), 10):
        try:
            written += store.put_many(records[start:start + 10])
        except OSError as exc:
            failure = exc
            break
    assert failure is not None and failure.errno == errno.ENOSPC, "the tiny filesystem never filled"
    assert str(root / "segments") in str(failure) and written > 0
    reopened = SummaryStore(root)
    assert len(reopened) == written and reopened.corrupt_lines == 0
    assert {r.key: r.text for r in reopened} == {key: text for key, text, _ in records[:written]}

    # Make room (grow the filesystem) and run again: only what is missing is written.
    subprocess.run(["mount", "-o", "remount,size=2m", str(tiny_filesystem)], check=True)
    rerun = SummaryStore(root)
    assert rerun.put_many(records) == len(records) - written
    done = SummaryStore(root)
    assert len(done) == len(records) and done.corrupt_lines == 0
    raw = [key for key, _ in _records(root)]
    assert len(raw) == len(set(raw)) == len(records)


# --------------------------------------------------------------------------- kill -9 and resume
_RUN = textwrap.dedent(
    """
    import sys
    from merlin_mllm.generation import GenerationSettings
    from merlin_mllm.summaries.user import summarize_users
    summarize_users(sys.argv[1], sys.argv[2], settings=GenerationSettings(max_new_tokens=16, batch_size=2), progress=False)
    """
)


@pytest.mark.slow
def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path, smollm2):
    from tests.test_user_summary import SETTINGS_KILL, write_dataset

    from merlin_mllm.summaries.user import summarize_users

    data = write_dataset(tmp_path / "data", lengths=(7, 5, 6))
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen([sys.executable, "-c", _RUN, str(data), str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        # Kill once the first batch is durable, i.e. in the middle of the run.
        while time.time() < deadline and proc.poll() is None and not _records(killed):
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = len(SummaryStore(killed))
    assert partial >= 1

    resumed = summarize_users(data, killed, settings=SETTINGS_KILL, model=smollm2, progress=False)
    reference = summarize_users(data, tmp_path / "reference", settings=SETTINGS_KILL, model=smollm2, progress=False)
    assert resumed.generated == reference.generated - partial  # nothing already stored is redone
    assert partial < reference.generated
    done, ref = SummaryStore(killed), SummaryStore(tmp_path / "reference")
    assert {r.key: r.text for r in done} == {r.key: r.text for r in ref}
    assert done.user_states() == ref.user_states()
    raw = [k for k, _ in _records(killed)]
    assert len(raw) == len(set(raw)) == len(done)  # no summary written twice, none lost
