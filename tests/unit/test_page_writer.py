"""The worker's background page writer: queued jobs' pages, pins and records reach the store
together, many jobs per transaction, and a failed write is reported for every job in it."""

from __future__ import annotations

import threading

from processfork.plugin.page_writer import PageWriter, QueuedPages
from processfork.store import Store, StoreFull, page_digest


def _job(name: str, pages: list[bytes], failures: list[tuple[str, str]]) -> QueuedPages:
    return QueuedPages(
        job=name,
        pages=[(None, p) for p in pages],
        meta=lambda result: {f"job:{name}": {"pages": [d.hex() for d in result.digests],
                                             "new": result.new}},
        failed=lambda exc: failures.append((name, type(exc).__name__)),
    )


def test_queued_jobs_commit_their_pages_pins_and_records_together(tmp_path):
    failures: list[tuple[str, str]] = []
    with Store(tmp_path / "s") as store:
        commits = []
        real = store.put_page_groups
        gate = threading.Event()

        def counted(groups):
            gate.wait(10)  # hold the first commit so that the next jobs queue up behind it
            commits.append([pin for pin, _, _ in groups])
            return real(groups)

        store.put_page_groups = counted  # type: ignore[method-assign]
        writer = PageWriter(lambda: store)
        pages = [bytes([i]) * 64 for i in range(4)]
        writer.submit(_job("a", pages[:2], failures))
        writer.submit(_job("b", pages[1:3], failures))
        writer.submit(_job("c", pages[3:], failures))
        gate.set()
        writer.close()
        assert failures == []
        assert commits[0] == ["a"] or commits == [["a", "b", "c"]]
        assert [pin for commit in commits for pin in commit] == ["a", "b", "c"]
        assert len(commits) <= 2
        assert store.has_pages([page_digest(p) for p in pages]) == [True] * 4
        b = store.meta_get("job:b")
        assert b == {"pages": [page_digest(p).hex() for p in pages[1:3]], "new": [False, True]}
        assert sorted(store.list_pins()) == ["a", "b", "c"]


def test_a_failed_write_is_reported_for_every_job_of_its_batch(tmp_path):
    failures: list[tuple[str, str]] = []
    with Store(tmp_path / "s") as store:
        def full(groups):
            raise StoreFull(str(tmp_path), "no space left on device")

        store.put_page_groups = full  # type: ignore[method-assign]
        writer = PageWriter(lambda: store)
        writer.submit(_job("a", [b"x" * 64], failures))
        writer.flush()
        writer.submit(_job("b", [b"y" * 64], failures))
        writer.close()
        assert failures == [("a", "StoreFull"), ("b", "StoreFull")]
        assert store.list_pins() == {}
