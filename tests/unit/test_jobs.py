"""The records that cross process boundaries keep their meaning through their encodings."""

from __future__ import annotations

import dataclasses

import pytest
from processfork.plugin.fingerprint import FINGERPRINT_FIELDS, Fingerprint, Mismatch
from processfork.plugin.jobs import (
    PARAMS_KEY,
    CaptureReply,
    CheckoutReply,
    EngineRecord,
    JobError,
    JobErrorKind,
    JobRecord,
    engine_meta_key,
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


FINGERPRINT = Fingerprint(
    backend="CPU_ATTN", batch_invariant=False, block_size=16, device="cpu", head_dim=64,
    isa="vec", kv_dtype="float32", layout="cpu_attn/BHN2D", model="tiny", model_config_hash="ab" * 8,
    num_kv_heads=2, num_layers=2, threads=4, tp_size=1, vllm_version="0.32.0",
)


def test_the_engine_record_survives_the_store_with_the_fingerprint_as_snapshots_store_it(tmp_path):
    record = EngineRecord(FINGERPRINT, num_blocks=512, page_bytes=8192, pid=41)
    with Store(tmp_path / "store") as store:
        store.meta_put(engine_meta_key("e"), record.to_json())
        stored = store.meta_get(engine_meta_key("e"))
    assert EngineRecord.from_json(stored) == record
    # Stored records have sorted keys; the fingerprint's JSON form is in that order already, so
    # GET /status shows the fingerprint as a manifest does.
    assert list(stored["fingerprint"]) == list(FINGERPRINT.to_json()) == sorted(FINGERPRINT.to_json())


def test_every_fingerprint_field_but_the_device_is_compared():
    names = [f.name for f in dataclasses.fields(Fingerprint)]
    assert sorted(FINGERPRINT_FIELDS) == sorted(set(names) - {"device"})
    assert len(FINGERPRINT_FIELDS) == len(set(FINGERPRINT_FIELDS))


def test_the_first_differing_field_in_comparison_order_is_reported():
    stored = FINGERPRINT.to_json()
    assert FINGERPRINT.first_mismatch(stored) is None
    assert FINGERPRINT.first_mismatch({**stored, "device": "cuda"}) is None
    other = {**stored, "vllm_version": "0.31.0", "num_layers": 3}
    assert FINGERPRINT.first_mismatch(other) == Mismatch("num_layers", 3, 2)
    older = {k: v for k, v in stored.items() if k != "threads"}
    assert FINGERPRINT.first_mismatch(older) == Mismatch("threads", None, 4)
