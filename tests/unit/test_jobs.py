"""The records that cross process boundaries keep their meaning through their encodings."""

from __future__ import annotations

import pytest
from processfork.plugin.jobs import (
    PARAMS_KEY,
    CaptureReply,
    CheckoutReply,
    JobError,
    JobErrorKind,
    JobRecord,
    job_meta_key,
)
from processfork.store import CorruptPage, Store, StoreFull

PAGES = [("0" * 32, "1" * 32), ("2" * 32, "3" * 32)]


@pytest.mark.parametrize("record", [
    JobRecord(final=True, blocks=2, new_blocks=1, bytes_written=8192, pages=PAGES),
    JobRecord(blocks=4, error=JobError(JobErrorKind.STORE_FULL, "StoreFull: store x is full")),
    JobRecord(final=True, blocks=4, error=JobError(JobErrorKind.FAILED, "ValueError: boom")),
    JobRecord(error=JobError(JobErrorKind.FAILED, "CorruptPage: page 00 does not match")),
])
def test_a_job_record_survives_the_store(tmp_path, record):
    with Store(tmp_path / "store") as store:
        store.meta_put(job_meta_key("j"), record.to_json())
        assert JobRecord.from_json(store.meta_get(job_meta_key("j"))) == record


def test_what_a_record_says_about_its_job():
    saved = JobRecord(final=True, blocks=2, pages=PAGES)
    failed = JobRecord(error=JobError(JobErrorKind.FAILED, "x"))
    failed_late = JobRecord(final=True, error=JobError(JobErrorKind.STORE_FULL, "x"))
    running = JobRecord(blocks=3)
    assert [r.settled for r in (saved, failed, failed_late, running)] == [True, True, True, False]
    assert [r.succeeded for r in (saved, failed, failed_late, running)] == [True, False, False, False]
    assert "pages" not in failed_late.to_json() and saved.to_json()["pages"] == [list(p) for p in
                                                                                 PAGES]


def test_error_kinds_come_from_the_exception_class_not_its_name():
    assert JobError.of(StoreFull("/s", "disk full")).kind is JobErrorKind.STORE_FULL
    assert JobError.of(CorruptPage("00", "11")).kind is JobErrorKind.FAILED

    class StoreFullLookalike(Exception):
        pass

    assert JobError.of(StoreFullLookalike()).kind is JobErrorKind.FAILED
    assert JobError.of(StoreFull("/s", "disk full")).message.startswith("StoreFull: ")


def test_a_reader_takes_an_unknown_error_kind_for_a_failure():
    record = JobRecord.from_json({"final": False, "error": {"kind": "cosmic_ray", "message": "m"}})
    assert record.error == JobError(JobErrorKind.FAILED, "m")


def test_replies_travel_in_kv_transfer_params():
    checkout = CheckoutReply(loaded_tokens=96, local_tokens=32)
    assert CheckoutReply.from_params(checkout.to_params()) == checkout
    assert CheckoutReply.from_params(None) == CheckoutReply(0, 0)  # an aborted request
    capture = CaptureReply([[1, 2, 3], [4]])
    assert CaptureReply.from_params(capture.to_params()) == capture
    assert CaptureReply.from_params({PARAMS_KEY: "garbage"}) == CaptureReply([])
