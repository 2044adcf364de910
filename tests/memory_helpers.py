"""Helpers for the memory and cache tests: a Python snippet run in a fresh interpreter (under
an rlimit or an environment of its own), answering with one JSON line, and a fake file system
for the memory guard's readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

#: Prepended to every snippet: limit the threads, set the address-space rlimit if asked.
_PRELUDE = """
import json, os, resource, sys
import torch
torch.set_num_threads(1)
_AS = int(os.environ.get("CONVMAT_TEST_RLIMIT_AS", "0"))
if _AS:
    resource.setrlimit(resource.RLIMIT_AS, (_AS, resource.getrlimit(resource.RLIMIT_AS)[1]))
def answer(**fields):
    print("ANSWER " + json.dumps(fields))
"""


def run_snippet(
    code: str, *, rlimit_as: int | None = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``code`` in a new interpreter (after importing torch, under ``rlimit_as`` bytes of
    address space if given) and return the fields it passed to ``answer(...)``.

    Fails the test, showing stderr, when the snippet exits non-zero or answers nothing.
    """
    environ = {k: v for k, v in os.environ.items() if k != "CONVMAT_CACHE_BYTES"}
    environ.update({"OMP_NUM_THREADS": "1", **(env or {})})
    if rlimit_as is not None:
        environ["CONVMAT_TEST_RLIMIT_AS"] = str(rlimit_as)
    script = _PRELUDE + textwrap.dedent(code)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environ, timeout=600
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("ANSWER ")]
    assert done.returncode == 0 and lines, (
        f"snippet exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    )
    return json.loads(lines[-1][len("ANSWER ") :])


class FakeFiles:
    """Stands in for ``convmat.engine.memory._read``: paths map to their text, others are
    unreadable."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = dict(files)

    def __call__(self, path: str) -> str | None:
        return self.files.get(path)


def meminfo(available: int) -> str:
    """A /proc/meminfo text with ``available`` bytes of MemAvailable."""
    return f"MemTotal:       99999999 kB\nMemAvailable:   {available // 1024} kB\n"


def status(vm_size: int, vm_data: int) -> str:
    """A /proc/self/status text with the given VmSize and VmData (bytes)."""
    return f"Name:\tpython\nVmSize:\t{vm_size // 1024} kB\nVmData:\t{vm_data // 1024} kB\n"
