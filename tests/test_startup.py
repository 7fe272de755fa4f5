"""reconciler/startup.py: httpx loads without trio and its own command line, and leaves no trace."""

from __future__ import annotations

import json
import subprocess
import sys

from reconciler.startup import HIDDEN

PROBE = """
import json, sys
before = {name for name, module in sys.modules.items() if module is None}
import reconciler.api
report = {"loaded": sorted(n for n in %r if n in sys.modules), "httpx": "httpx" in sys.modules,
          "placeholders": sorted({n for n, m in sys.modules.items() if m is None} - before)}
import httpx._main  # hidden only while httpx loaded: importable again now
print(json.dumps(report))
"""


def test_importing_the_api_loads_httpx_without_trio_or_its_cli_and_leaves_no_placeholder():
    done = subprocess.run([sys.executable, "-c", PROBE % (HIDDEN,)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"loaded": [], "httpx": True, "placeholders": []}
