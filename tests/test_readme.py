"""The README is generated from the front-page notebook, and every example in it runs as written."""
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_matches_index_notebook():
    spec = importlib.util.spec_from_file_location("make_readme", ROOT / "scripts" / "make_readme.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    assert (ROOT / "README.md").read_text() == mod.render(), "run: python scripts/make_readme.py"


def test_readme_links_exist():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?:nbs|benchmarks|paligemma_edu)/[^)#]+)\)", text) + re.findall(r"\]\((BENCHMARKS\.md)\)", text)
    for link in links:
        assert (ROOT / link).exists(), f"README links to missing {link}"


# The README's examples, run as written: its fenced blocks in order, in an empty folder, so every file a command names
# must have been made by an earlier step. A block preceded by `<!-- not run by tests/test_readme.py: REASON -->` is left
# out with that reason (the network, a real checkpoint, a quarter of an hour of training, the test command itself).
SKIP = re.compile(r"<!-- not run by tests/test_readme\.py: (.+?) -->")


def readme_blocks(text=None) -> list:
    "The README's fenced blocks in order: dicts with lang, code, shown (the plain block printed after it) and skip."
    lines, blocks, i = (text or (ROOT / "README.md").read_text()).splitlines(), [], 0
    while i < len(lines):
        if not lines[i].startswith("```"): i += 1; continue
        j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
        prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        block = dict(lang=lines[i][3:].strip(), code="\n".join(lines[i + 1:j]), shown=None,
                     skip=(SKIP.fullmatch(prev.strip()) or [None, None])[1])
        if block["lang"] == "" and blocks and blocks[-1]["lang"] == "python": blocks[-1]["shown"] = block["code"]
        else: blocks.append(block)
        i = j + 1
    return blocks


def test_readme_blocks_are_parsed():
    text = "a\n```python\nx = 1\nx\n```\n```\n1\n```\n<!-- not run by tests/test_readme.py: why -->\n```bash\nls\n```\n"
    assert readme_blocks(text) == [dict(lang="python", code="x = 1\nx", shown="1", skip=None),
                                   dict(lang="bash", code="ls", shown=None, skip="why")]


def run_python(code: str, namespace: dict):
    "Run a block as a notebook cell: the statements, then the value of a final expression (None if there is none)."
    import ast
    tree = ast.parse(code)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<README>", "exec"), namespace)
    return None if last is None else eval(compile(ast.Expression(last.value), "<README>", "eval"), namespace)


def test_readme_examples_run_as_written(tmp_path, monkeypatch, capsys):
    "Every block not marked otherwise runs, in order, in an empty folder; Python shows what the README shows."
    import shlex
    from IPython.lib.pretty import pretty
    from paligemma_edu.cli import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace, ran = {}, 0
    for b in readme_blocks():
        if b["skip"]: continue
        if b["lang"] == "python":
            value = run_python(b["code"], namespace)
            if b["shown"] is not None:
                assert pretty(value) == b["shown"], f"the README shows\n{b['shown']}\nthe code gives\n{pretty(value)}"
        elif b["lang"] == "bash":
            for line in b["code"].splitlines():
                words, said = shlex.split(line, comments=True), re.findall(r'#.*?"([^"]+)"', line)
                if not words: continue
                assert words[0] == "paligemma-edu", f"the test runs paligemma-edu commands only; add a case for: {line}"
                capsys.readouterr()
                assert main(words[1:]) == 0, f"{line}\n{capsys.readouterr().err}"
                out = capsys.readouterr().out
                for text in said: assert text in out, f"{line}: the README says it prints {text!r}; it printed:\n{out}"
        else: raise AssertionError(f"a README block in {b['lang']!r}: say how to run it, or mark it")
        ran += 1
    assert ran >= 4 and (tmp_path / "scene.png").exists() and (tmp_path / "demo.png").exists()


def test_readme_install_and_test_commands_are_what_ci_runs():
    "The blocks the README test leaves out are still run: CI (.ci/run) runs the install lines and the test command."
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = {b["code"].splitlines()[0]: b for b in readme_blocks() if b["skip"]}
    install = blocks["python -m venv .venv && . .venv/bin/activate"]["code"].splitlines()
    for line in install:
        cmd = re.sub(r"\s+--index-url \S+", "", line.split("#")[0]).strip()  # CI's index serves the CPU build itself
        if cmd.startswith("pip install"): assert cmd.replace("pip install", "pip install -q") in ci, cmd
    assert "--index-url https://download.pytorch.org/whl/cpu" in install[1] and "download.pytorch.org" not in ci
    test_cmd = blocks["OMP_NUM_THREADS=1 python -m pytest -q"]["code"]
    assert "export OMP_NUM_THREADS=1" in ci and "\npython -m pytest -q\n" in ci, test_cmd
    reasons = [b["skip"] for b in readme_blocks() if b["skip"]]
    assert all(len(r) > 10 for r in reasons), reasons
