"""An aborted session turn's saves are dropped even when the worker writes them late.

The worker's page writer commits a step's pages, pin and job record after the engine step has
returned; a turn aborted in the meantime must not leave that pin behind (it would keep the
pages from gc until the pin is found stale)."""

from __future__ import annotations

import threading
import time

from processfork.plugin.jobs import JobRecord, job_meta_key
from processfork.plugin.sessions import SessionCommitter
from processfork.store import Store, page_digest


def test_a_turn_discarded_before_its_saves_are_written_leaves_no_pin(tmp_path):
    with Store(tmp_path / "store") as store:
        committer = SessionCommitter(store)
        steps = ["turn-a.0", "turn-a.4"]
        page = bytes(range(256)) * 16
        digest = page_digest(page)

        def late_writer() -> None:  # the worker's page writer, a moment after the abort
            time.sleep(0.3)
            for step in steps:
                record = JobRecord(final=True, blocks=1, new_blocks=1,
                                   pages=[(digest.hex(), digest.hex())])
                store.put_pages_hashed([(digest, page), (digest, None)], pin=step,
                                       meta=lambda _, s=step, r=record: {job_meta_key(s): r.to_json()})

        writer = threading.Thread(target=late_writer)
        writer.start()
        committer.discard(steps)
        committer.flush()
        writer.join()
        assert store.list_pins() == {}
        assert store.meta_items("job:") == {}
        committer.close()
