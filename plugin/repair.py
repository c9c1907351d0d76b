"""Repairing a snapshot whose pages are damaged or missing: recompute them on the engine.

A damaged page is never loaded (a checkout verifies every page and recomputes what fails), but
every later checkout of every snapshot that names it pays that recomputation. The token ids of the
snapshot are what its KV was computed from, so the engine can compute it again:

1. the damaged page records are deleted (store/damage.py), so that the recomputed pages are
   stored instead of being deduplicated against them;
2. each affected sequence runs through the engine as a snapshot job (the same path as
   `POST /snapshot`, without committing a snapshot);
3. if the recomputed pages have the digests the snapshot names, they are back in place, for every
   snapshot that shares them (a fork's children too): the snapshot and its cid are unchanged.
   Otherwise (the engine computed other bits, e.g. under another batch split) a repaired copy is
   committed in the damaged snapshot's place (its parents, fork and name), and every ref pointing
   at the damaged one moves to it, in one transaction.

A model with several KV-cache groups is repaired the same way: the snapshot job saves each
group's blocks (a sliding-window group the window of the sequence's split point, as any snapshot
stores it), so a damaged page of any group is computed again.

Damaged token ids or page tables cannot be recomputed: those snapshots are refused with
`unrepairable`, and the store must come from a copy.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from processfork.store import Manifest, SnapshotSequence
from processfork.store.manifest import FORMAT_HEADS

from .api_errors import ApiError
from .api_models import RepairResponse
from .control import Ranks, elapsed_ms
from .kv_groups import GroupLayout, group_job, manifest_format

if TYPE_CHECKING:
    from .control import Control

__all__ = ["repair_snapshot"]


async def repair_snapshot(control: Control, rev: str) -> RepairResponse:
    t0 = time.perf_counter()
    store = control.store
    cid = await control._run(store.resolve, rev)
    damage = await control._run(store.find_damage, cid)
    if damage.intact:
        return RepairResponse(cid=cid, damaged_pages=0, result="intact", ms=elapsed_ms(t0))
    if not damage.recomputable:
        what = [f"token ids {d[:12]}" for d in damage.tokens]
        what += [f"page table {d[:12]}" for d in damage.tables]
        raise ApiError(
            422,
            "unrepairable",
            f"snapshot {cid[:19]} has damaged {', '.join(what)}: the engine can recompute pages, "
            "not the token ids and page tables that name them; restore the store from a copy",
        )
    manifest = await control._run(store.get_snapshot, cid)
    record = await control.require_compatible(cid, manifest)
    layout = (GroupLayout.from_fingerprint(record.fingerprint.kv_groups)
              if record.fingerprint.kv_groups is not None else None)
    ranks = Ranks.of(record)
    if (manifest.format == FORMAT_HEADS) != (ranks.heads is not None):
        # Recomputed pages must be of the snapshot's kind to take the damaged ones' place.
        kind = "pages of one KV head" if manifest.format == FORMAT_HEADS else "whole-block pages"
        raise ApiError(409, "incompatible_snapshot",
                       f"snapshot {cid[:19]} holds {kind}, which this engine at "
                       f"tp_size={record.fingerprint.tp_size} does not write; repair it on an "
                       f"engine at tp_size={manifest.fingerprint.get('tp_size')}")
    cleared = await control._run(store.clear_damaged_pages, damage.pages)

    def recomputed(result: Literal["restored", "replaced"], **replacement: Any) -> RepairResponse:
        return RepairResponse(cid=cid, damaged_pages=len(damage.pages), result=result,
                              cleared_pages=len(cleared),
                              recomputed_sequences=len(damage.sequences), ms=elapsed_ms(t0),
                              **replacement)

    jobs: list[str] = []
    group_jobs: list[str] = []  # each group's pages are saved under a job of their own
    sequences = list(manifest.sequences)
    try:
        for index in damage.sequences:
            seq = manifest.sequences[index]
            tokens = list(await control._run(store.get_tokens, seq.tokens))
            control._check_length(tokens)
            job = uuid.uuid4().hex
            jobs.append(job)
            group_jobs += [group_job(job, g) for g in
                           range(len(layout.groups) if layout is not None else 1)]
            outcome = await control._snapshot_sequence(job, tokens, [], layout, ranks)
            sequences[index] = SnapshotSequence(tokens=seq.tokens, pages=outcome.pages,
                                                groups=outcome.groups, heads=ranks.heads)
        after = await control._run(store.find_damage, cid)
        if after.intact:
            await control._run(control._forget_jobs, jobs, group_jobs, ranks)
            return recomputed("restored")
        # The copy takes the damaged snapshot's place in history (same parents, fork and name);
        # the damaged one stays in the reflogs until they expire, then gc removes it.
        copy = Manifest(
            format=FORMAT_HEADS if ranks.heads is not None else manifest_format(layout),
            name=manifest.name,
            parents=list(manifest.parents),
            fork=manifest.fork,
            fingerprint=record.fingerprint.to_json(),
            sequences=sequences,
        )
        new_cid, moved = await control._run(
            lambda: store.write_replacement(
                copy,
                replaces=cid,
                message=f"recomputed {len(after.pages)} damaged page(s) of {cid[:19]}",
                drop_pins=group_jobs,
                drop_meta=[k for job in group_jobs for k in ranks.keys(job)],
            )
        )
    except BaseException:
        await control._run(control._forget_jobs, jobs, group_jobs, ranks)
        raise
    return recomputed("replaced", new_cid=new_cid, moved_refs=moved)
