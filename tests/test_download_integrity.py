"""Issue 18 (19 and the download parts of 15): a result file is skipped only when its bytes are
the ones downloaded, and a results path that cannot hold a file is said before anything is fetched.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import Repo, applied, cli, waited


@pytest.fixture
def done(repo, api_env) -> Repo:
    """A repo whose spec `a` has a finished batch."""
    repo.spec("a")
    applied(repo, api_env)
    waited(repo, api_env)
    return repo


def test_a_corrupted_file_of_the_same_size_and_mtime_is_downloaded_again(done, emulator_server, api_env):
    first = cli(done, api_env, "download")
    assert "Downloaded 1 file(s); 0 already there." in first.out, first.out + first.err
    output = done.root / "results" / "a" / "output.jsonl"
    good, stat = output.read_bytes(), output.stat()
    output.write_bytes(good.replace(b"a-0", b"a-X", 1))
    os.utime(output, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert output.stat().st_size == stat.st_size and output.stat().st_mtime_ns == stat.st_mtime_ns

    again = cli(done, api_env, "download")
    assert "Downloaded 1 file(s); 0 already there." in again.out, again.out
    assert output.read_bytes() == good


def test_the_manifest_records_the_sha256_of_what_was_written(done, api_env):
    import hashlib

    assert cli(done, api_env, "download").code == 0
    manifest = json.loads((done.root / "results" / ".batchplan-downloads.json").read_text())
    output = (done.root / "results" / "a" / "output.jsonl").read_bytes()
    assert len(manifest["entries"]) == 2  # the batch's own copy and the latest
    entry = manifest["entries"]["results/a/output.jsonl"]
    assert entry["sha256"] == hashlib.sha256(output).hexdigest() and entry["bytes"] == len(output)
    assert set(entry) == {"file_id", "bytes", "sha256"}


def test_a_results_name_that_is_a_file_is_said_before_anything_is_fetched(done, emulator_server, api_env):
    (done.root / "results").mkdir()
    (done.root / "results" / "a").write_text("my notes\n")
    fetched = emulator_server.count("GET", "/v1/files/")

    result = cli(done, api_env, "download")
    assert result.code == 1 and "Traceback" not in result.err and "Internal error" not in result.err, result.err
    assert "results/a/output.jsonl: results/a is a file, not a directory; move it away" in result.err
    assert emulator_server.count("GET", "/v1/files/") == fetched
    assert (done.root / "results" / "a").read_text() == "my notes\n"


def test_an_output_file_that_is_a_directory_is_said_before_anything_is_fetched(done, emulator_server, api_env):
    (done.root / "results" / "a" / "output.jsonl").mkdir(parents=True)
    fetched = emulator_server.count("GET", "/v1/files/")

    result = cli(done, api_env, "download")
    assert result.code == 1 and "Traceback" not in result.err and "Internal error" not in result.err, result.err
    assert "results/a/output.jsonl: is a directory, not a file; move it away" in result.err
    assert emulator_server.count("GET", "/v1/files/") == fetched


def test_a_damaged_manifest_costs_only_a_download_again(done, api_env):
    assert cli(done, api_env, "download").code == 0
    manifest = done.root / "results" / ".batchplan-downloads.json"
    for damage in (b"[" * 100_000, b'{"files": {"results/a/output.jsonl": []}}', b"\xff"):
        manifest.write_bytes(damage)
        result = cli(done, api_env, "download")
        assert result.code == 0, result.err
        assert "Downloaded 1 file(s); 0 already there." in result.out
