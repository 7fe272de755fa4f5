"""Import: record a batch made elsewhere (the console, a script, the SDK) under a spec name.

`import_entry` is pure: it compares what the server says the batch was made from with
what the spec wants, and returns the state entry to record. When they agree, the entry
records the spec's own fields, so the next plan is a noop. When they differ, the entry
records what the batch really was made from, so the next plan is a replace whose diff
shows exactly the fields that differ.

Not everything can be read back: the API never returns `output_expires_after`, and the
content of an uploaded batch input cannot be downloaded. A local input is checked by the
content hash in the file name when batchplan uploaded it, else only by its size; the
notes say which.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .batch import BatchRecord
from .desired import Desired, spec_hash
from .remote import uploaded_sha256
from .spec import RESERVED_PREFIX
from .state import Entry


@dataclass(frozen=True)
class Imported:
    entry: Entry
    differs: tuple[str, ...]     # fields where the batch and the spec disagree
    notes: tuple[str, ...]       # what could not be checked, for the user


def import_entry(want: Desired, batch: dict, input_file: dict | None, local_input: Path | None) -> Imported:
    """The state entry for `batch` under `want.name`. Pure.

    input_file: the batch's input file object (GET /files/{id}), None when it is gone.
    local_input: the spec's local input file, when it has one.
    """
    actual = {"endpoint": batch.get("endpoint"), "completion_window": batch.get("completion_window"),
              "metadata": {k: v for k, v in sorted((batch.get("metadata") or {}).items())
                           if not k.startswith(RESERVED_PREFIX)}}
    wanted = want.fields()
    differs = [key for key, value in actual.items() if getattr(wanted, key) != value]
    made_from = {key: actual[key] for key in differs}
    same_input, notes = _same_input(want, batch["input_file_id"], input_file, local_input)
    if not same_input:
        differs.append("input")
        made_from.update(input=None, input_sha256=None, input_file_id=batch["input_file_id"])
    fields = wanted.model_copy(update=made_from)
    if want.output_expires_after:
        notes.append("the API does not return output_expires_after; recorded the spec's value unchecked")
    entry = Entry(spec_hash=want.spec_hash if not differs else spec_hash(fields), fields=fields,
                  batch=BatchRecord.from_api(batch), prevent_cancel=want.prevent_cancel, base_url=want.base_url)
    return Imported(entry, tuple(differs), tuple(notes))


def _same_input(want: Desired, file_id: str, input_file: dict | None,
                local_input: Path | None) -> tuple[bool, list[str]]:
    if want.input_file_id:
        return want.input_file_id == file_id, []
    if input_file is None:
        return True, [f"its input file {file_id} is gone from the server, so its content cannot be compared "
                      f"with {want.input}; recorded the spec's current input hash"]
    named = uploaded_sha256(input_file)
    if named:
        return named == want.input_sha256, []
    if local_input is not None and input_file.get("bytes") != local_input.stat().st_size:
        return False, []
    return True, [f"the server cannot return the content of a batch input file, so {file_id} was only checked "
                  f"to be as large as {want.input} ({input_file.get('bytes')} bytes); recorded the spec's "
                  "current input hash"]
