"""The Files API's rules for uploads and downloads that the sandbox enforces like the real one.

Kept apart from the world (emulator.py) because they are plain rules of the wire: a
`purpose=batch` upload must be a `.jsonl` file of at most 200 MB and expires after
30 days unless told otherwise; file content comes back as an attachment.
"""

from __future__ import annotations

from urllib.parse import quote

from reconciler.inputs import MAX_BYTES

MAX_BATCH_UPLOAD_BYTES = MAX_BYTES  # 200 MB, the Batch API's limit for an input file
MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # any other purpose
BATCH_FILE_SECONDS = 30 * 86400  # purpose=batch files expire 30 days after upload by default


def upload_refusal(purpose: str, filename: str, size: int, max_batch_bytes: int) -> str | None:
    """The real API's message refusing this upload (a 400 with no param or code), or None."""
    if purpose == "batch" and not filename.lower().endswith(".jsonl"):
        return "Invalid file format for Batch API. Must be .jsonl"
    limit = max_batch_bytes if purpose == "batch" else MAX_UPLOAD_BYTES
    if size > limit:
        return "File is too large."
    return None


def default_expiry(purpose: str, now: float) -> float | None:
    """When a file uploaded without `expires_after` expires: batch input files after 30 days."""
    return now + BATCH_FILE_SECONDS if purpose == "batch" else None


def content_disposition(filename: str) -> str:
    """`attachment` with the file's name; quotes and non-ASCII go in the RFC 6266 `filename*` form."""
    if filename.isascii() and '"' not in filename and "\\" not in filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename*=UTF-8''{quote(filename, safe='')}"
