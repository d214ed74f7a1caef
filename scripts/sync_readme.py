"""Regenerate what the README shows of the machine (tests fail when it is stale): the
mermaid block, and the machine version in every example that prints it
(`order-saga diagram`'s stderr, /healthz, check-upgrade, the state-migration recipe).
Run it after changing fsm/machine.py: `.venv/bin/python scripts/sync_readme.py`."""

import re
from pathlib import Path

from fsm.diagram import render
from fsm.version import MACHINE_VERSION

# Where the README prints the installed machine's version (an older one, such as the
# "written by machine 5b0c…" of a stranded order, is left alone).
VERSION_SPOTS = re.compile(
    r"(machine version |under machine |machine_version=\"|\"machine_version\":\")[0-9a-f]{12}"
)

readme = Path(__file__).resolve().parent.parent / "README.md"
text = readme.read_text()
start = text.index("```mermaid\n") + len("```mermaid\n")
end = text.index("```", start)
block = render("mermaid").decode()
text = text[:start] + block.rstrip("\n") + "\n" + text[end:]
text, n = VERSION_SPOTS.subn(lambda m: m.group(1) + MACHINE_VERSION, text)
readme.write_text(text)
lines = block.count("\n")
print(f"README.md: mermaid block ({lines} lines), machine version {MACHINE_VERSION} in {n} places")
