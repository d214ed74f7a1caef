"""Regenerate the README's mermaid block from the machine (tests fail when it is stale)."""

from pathlib import Path

from fsm.diagram import render

readme = Path(__file__).resolve().parent.parent / "README.md"
text = readme.read_text()
start = text.index("```mermaid\n") + len("```mermaid\n")
end = text.index("```", start)
block = render("mermaid").decode()
readme.write_text(text[:start] + block.rstrip("\n") + "\n" + text[end:])
print(f"README.md: mermaid block updated ({block.count(chr(10))} lines)")
