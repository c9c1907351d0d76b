"""`pf remote`, `pf push`, `pf fetch`, `pf pull` and `pf clone` against a real S3 endpoint:
their documents, their exit codes, and one line for every error."""

from __future__ import annotations

from pathlib import Path

import boto3
from processfork.store import Store
from processfork.store.remote import parse_url
from remote_helpers import make_snapshot, pf


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pf: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_remote_add_list_remove(tmp_path: Path, remote_url: str) -> None:
    store = tmp_path / "a"
    Store(store).close()
    assert pf(store, "remote", "add", "origin", remote_url + "/").exit_code == 0
    assert pf(store, "remote", "list", "--json").json() == {
        "remotes": [{"name": "origin", "url": remote_url}]
    }
    again = pf(store, "remote", "add", "origin", "s3://other-bucket")
    assert again.exit_code == 1 and "already exists" in _one_error_line(again.stderr)
    bad = pf(store, "remote", "add", "up", "http://example.com/x")
    assert bad.exit_code == 1 and "s3://BUCKET" in _one_error_line(bad.stderr)
    bad_name = pf(store, "remote", "add", "a/b", remote_url)
    assert bad_name.exit_code == 1
    assert pf(store, "remote", "-q").stdout == "origin\n"
    assert pf(store, "remote", "remove", "origin").exit_code == 0
    gone = pf(store, "remote", "remove", "origin")
    assert gone.exit_code == 1 and "no remote named 'origin'" in _one_error_line(gone.stderr)
    unknown = pf(store, "push", "origin", "main")
    assert unknown.exit_code == 1 and "no remote named" in _one_error_line(unknown.stderr)


def test_push_clone_pull_through_the_cli(tmp_path: Path, remote_url: str) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with Store(a) as st:
        base = make_snapshot(st, "main", tokens=range(100))
        st.checkout_head("main")
    assert pf(a, "remote", "add", "origin", remote_url).exit_code == 0
    pushed = pf(a, "push", "origin", "--json")  # HEAD's ref
    assert pushed.exit_code == 0, pushed.stderr
    doc = pushed.json()
    assert [(r["ref"], r["status"], r["new"]) for r in doc["refs"]] == [("main", "created", base)]
    assert doc["pages"] == 14 and doc["snapshots"] == 1 and doc["packs"] == 1

    cloned = pf(None, "clone", remote_url, str(b), "--json")
    assert cloned.exit_code == 0, cloned.stderr
    assert cloned.json()["fetch"]["pages"] == 14
    log = pf(b, "log", "main", "-q")
    assert log.stdout.split() == [base]
    assert pf(b, "fsck").exit_code == 0
    again = pf(None, "clone", remote_url, str(b))
    assert again.exit_code == 1 and "not an empty folder" in _one_error_line(again.stderr)

    with Store(a) as st:
        child = make_snapshot(st, "main", parents=[base], tokens=range(120))
    assert pf(a, "push", "origin", "main", "-q").stdout == "main\n"
    pulled = pf(b, "pull", "origin", "--json")
    assert pulled.exit_code == 0, pulled.stderr
    assert [(m["ref"], m["status"]) for m in pulled.json()["refs"]] == [("main", "fast-forward")]
    assert pulled.json()["fetch"]["pages"] == 16 and pulled.json()["fetch"]["snapshots"] == 1
    assert pf(b, "log", "main", "-q").stdout.split() == [child, base]

    # Both sides continue main: the later push is refused, the pull reports the divergence.
    with Store(b) as st:
        mine = make_snapshot(st, "main", parents=[child], tokens=range(140))
    with Store(a) as st:
        make_snapshot(st, "main", parents=[child], tokens=range(150))
    assert pf(a, "push", "origin", "main").exit_code == 0
    refused = pf(b, "push", "origin", "main")
    assert refused.exit_code == 1
    assert "ref 'main' not updated" in _one_error_line(refused.stderr)
    diverged = pf(b, "pull", "origin")
    assert diverged.exit_code == 1 and "diverged" in diverged.stderr.splitlines()[-1]
    assert pf(b, "refs", "--json").json()["refs"][0]["cid"] == mine
    forced = pf(b, "push", "origin", "main", "--force", "--json")
    assert forced.exit_code == 0 and forced.json()["refs"][0]["status"] == "forced"


def test_push_after_a_fork_sends_metadata_only(tmp_path: Path, remote_url: str) -> None:
    a = tmp_path / "a"
    with Store(a) as st:
        make_snapshot(st, "base", tokens=range(2000))
    assert pf(a, "remote", "add", "origin", remote_url).exit_code == 0
    first = pf(a, "push", "origin", "base", "--json").json()
    children = pf(a, "fork", "base", "-n", "12", "-q").stdout.split()
    refs = [f"base/{i}" for i in range(12)]
    doc = pf(a, "push", "origin", *refs, "--json").json()
    assert (doc["pages"], doc["blobs"], doc["snapshots"], doc["packs"]) == (0, 0, 12, 1)
    assert doc["bytes"] <= 12 * 1024 and first["bytes"] > 100 * doc["bytes"]
    # A write per child's ref; besides: the format record, the listings of refs and packs, one
    # pack and its index, the listing that checks the packs it re-uses before the refs move.
    assert doc["requests"] == 12 + 6
    assert [r["new"] for r in doc["refs"]] == [children[int(r["ref"].split("/")[1])]
                                              for r in doc["refs"]]


def test_errors_of_remotes_are_one_line(tmp_path: Path, remote_url: str) -> None:
    a = tmp_path / "a"
    with Store(a) as st:
        cid = make_snapshot(st, "main", tokens=range(64))
    assert pf(a, "remote", "add", "origin", remote_url).exit_code == 0
    missing_ref = pf(a, "push", "origin", "nope")
    assert missing_ref.exit_code == 1 and "no local ref 'nope'" in _one_error_line(missing_ref.stderr)
    assert pf(a, "push", "origin", "main").exit_code == 0
    not_there = pf(a, "fetch", "origin", "other")
    assert not_there.exit_code == 1 and "has no ref 'other'" in _one_error_line(not_there.stderr)
    down = pf(a, "push", "origin", "main", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert down.exit_code == 2 and "cannot use remote" in _one_error_line(down.stderr)

    # Damage a page in the remote's pack: a clone fails, exit 3, and leaves no folder.
    loc = parse_url(remote_url)
    s3 = boto3.session.Session().client("s3")
    (key,) = [o["Key"] for o in s3.list_objects_v2(Bucket=loc.bucket, Prefix=loc.key("packs/"))[
        "Contents"] if o["Key"].endswith(".pack")]
    body = bytearray(s3.get_object(Bucket=loc.bucket, Key=key)["Body"].read())
    body[7] ^= 1
    s3.put_object(Bucket=loc.bucket, Key=key, Body=bytes(body))
    bad = pf(None, "clone", remote_url, str(tmp_path / "b"))
    assert bad.exit_code == 3 and "corrupt page" in _one_error_line(bad.stderr)
    assert not (tmp_path / "b").exists()
    with Store(a) as st:
        assert st.get_snapshot(cid).name == "main"


def test_gc_remote_through_the_cli(tmp_path: Path, remote_url: str) -> None:
    a = tmp_path / "a"
    with Store(a) as st:
        make_snapshot(st, "main", tokens=range(64))
        other = make_snapshot(st, "other", tokens=range(80))
    assert pf(a, "remote", "add", "origin", remote_url).exit_code == 0
    assert pf(a, "push", "origin", "main").exit_code == 0
    assert pf(a, "push", "origin", "other:main").exit_code == 1  # not a ref name
    assert pf(a, "ref", "set", "main", other).exit_code == 0
    assert pf(a, "push", "origin", "main", "--force").exit_code == 0
    young = pf(a, "gc", "--remote", "origin", "--json").json()
    assert (young["removed_packs"], young["kept_young"], young["kept_packs"]) == (0, 1, 1)
    dry = pf(a, "gc", "--remote", "origin", "--prune", "now", "--dry-run", "--json").json()
    assert dry["removed_packs"] == 1 and dry["dry_run"] is True
    done = pf(a, "gc", "--remote", "origin", "--prune", "now", "--json").json()
    assert done["removed_packs"] == 1 and done["removed_bytes"] > 0
    assert pf(a, "gc", "--remote", "origin", "--prune", "now", "--json").json()["removed_packs"] == 0
    clone = pf(None, "clone", remote_url, str(tmp_path / "b"), "-q")
    assert clone.exit_code == 0 and pf(tmp_path / "b", "fsck").exit_code == 0
    unknown = pf(a, "gc", "--remote", "nope")
    assert unknown.exit_code == 1 and "no remote named 'nope'" in _one_error_line(unknown.stderr)
