"""The README is generated from the front-page notebook; this catches drift between them."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_matches_index_notebook():
    spec = importlib.util.spec_from_file_location("make_readme", ROOT / "scripts" / "make_readme.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    assert (ROOT / "README.md").read_text() == mod.render(), "run: python scripts/make_readme.py"


def test_readme_links_exist():
    import re
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?:nbs|benchmarks|paligemma_edu)/[^)#]+)\)", text) + re.findall(r"\]\((BENCHMARKS\.md)\)", text)
    for link in links:
        assert (ROOT / link).exists(), f"README links to missing {link}"
