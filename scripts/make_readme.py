"""Write README.md from nbs/index.ipynb (the front page), or check that they agree.

Quarto (nbdev_readme) is not used: this keeps the two in sync with no extra tool. Markdown cells are copied, code
cells become ```python blocks (cells starting with `#| hide` are skipped) followed by their stored result (the
`execute_result` text, as Jupyter shows it) in a plain ``` block, image links are rewritten relative to the
repository root. A cell flagged `#| output: asis` is run (after the `#| hide` cells) and what it prints is copied as
markdown: that is how numbers read from result files reach the README. Usage: python scripts/make_readme.py [--check]
"""
import contextlib
import io
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "<!-- Generated from nbs/index.ipynb by scripts/make_readme.py: edit the notebook, not this file. -->\n\n"


def render(nb_path=ROOT / "nbs" / "index.ipynb") -> str:
    "README text for the index notebook."
    cells = json.loads(Path(nb_path).read_text())["cells"]
    parts, namespace = [], {}
    for c in cells:
        src = "".join(c["source"]).strip()
        if not src: continue
        if c["cell_type"] == "markdown":
            parts.append(re.sub(r"\]\((images/[^)]+)\)", r"](nbs/\1)", src))
        elif src.startswith("#| hide"):
            exec(src, namespace)
        elif "#| output: asis" in src:
            out = io.StringIO()
            with contextlib.redirect_stdout(out): exec(src, namespace)
            parts.append(out.getvalue().strip())
        elif c["cell_type"] == "code":
            parts.append("```python\n" + src + "\n```")
            shown = [o["data"]["text/plain"] for o in c.get("outputs", []) if o.get("output_type") == "execute_result"]
            if shown: parts.append("```\n" + "".join(shown[-1]).strip() + "\n```")
    return HEADER + "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    text, readme = render(), ROOT / "README.md"
    if "--check" in sys.argv:
        if readme.read_text() != text:
            sys.exit("README.md is out of date with nbs/index.ipynb: run python scripts/make_readme.py")
        print("README.md matches nbs/index.ipynb")
    else:
        readme.write_text(text)
        print(f"wrote {readme}")
