"""The documentation: a short README, the named pages, and an API reference that covers every public module.

The site itself is built by `make docs` (`mkdocs build --strict`, part of `make test`); these tests check what the
build cannot: the README's length and links, the page list, and that the reference generator's module walk
(docs/gen_ref_pages.py) finds exactly the modules Python can import.
"""

from __future__ import annotations

import importlib.util
import pkgutil
import re
from pathlib import Path

import pytest
import yaml

import sentio_lab

ROOT = Path(__file__).resolve().parent.parent
PAGES = ("index", "training", "evaluation", "masks", "risk", "transformer", "costs", "scaling", "deployment",
         "data", "choices", "benchmarks", "portfolio")
README_MAX_LINES = 200


def _gen_ref_pages():
    """The reference generator, imported as a module (it writes pages only when mkdocs-gen-files runs it)."""
    spec = importlib.util.spec_from_file_location("gen_ref_pages", ROOT / "docs" / "gen_ref_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _importable_public_modules() -> set[str]:
    """Every module and subpackage of sentio_lab that pkgutil finds, without a private path component."""
    found = {"sentio_lab"}
    for info in pkgutil.walk_packages(sentio_lab.__path__, prefix="sentio_lab."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            found.add(info.name)
    return found


def _mkdocs_config() -> dict:
    """mkdocs.yml as plain data."""
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in t]
    assert targets, "README links to the documentation pages"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
    for page in PAGES:
        assert f"(docs/{page}.md)" in text, f"README does not link docs/{page}.md"


@pytest.mark.parametrize("page", PAGES)
def test_page_exists_with_a_title_and_is_in_the_nav(page):
    path = ROOT / "docs" / f"{page}.md"
    assert path.is_file(), f"docs/{page}.md is missing"
    assert path.read_text().startswith("# "), f"docs/{page}.md must start with its '# ' title"
    nav_files = [next(iter(entry.values())) for entry in _mkdocs_config()["nav"]]
    assert f"{page}.md" in nav_files


def test_site_is_strict_and_generates_the_reference():
    config = _mkdocs_config()
    assert config["strict"] is True
    assert config["theme"]["name"] == "material"
    plugins = {next(iter(p)) if isinstance(p, dict) else p: p for p in config["plugins"]}
    assert {"gen-files", "literate-nav", "mkdocstrings"} <= set(plugins)
    assert plugins["gen-files"]["gen-files"]["scripts"] == ["docs/gen_ref_pages.py"]
    assert {"API reference": "reference/"} in config["nav"]


def test_reference_walk_matches_pkgutil():
    walked = _gen_ref_pages().public_modules()
    assert walked == sorted(walked) and len(walked) == len(set(walked))
    assert set(walked) == _importable_public_modules()


def test_reference_walk_leaves_out_private_modules(tmp_path):
    package = tmp_path / "pkg"
    for relative in ("__init__.py", "__main__.py", "_private.py", "public.py", "sub/__init__.py", "sub/_hidden.py",
                     "sub/shown.py", "_internal/__init__.py", "_internal/inner.py"):
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_text('"""Doc."""\n')
    walked = _gen_ref_pages().public_modules(root=tmp_path, package="pkg")
    assert walked == ["pkg", "pkg.public", "pkg.sub", "pkg.sub.shown"]


def test_generated_reference_has_a_page_per_public_module(tmp_path):
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files
    from mkdocs_gen_files.editor import FilesEditor

    generator = _gen_ref_pages()
    config = MkDocsConfig()
    config.load_dict({"site_name": "test", "docs_dir": str(ROOT / "docs")})
    with FilesEditor(Files([]), config, str(tmp_path)):
        generator.write_reference()
    pages = {path.relative_to(tmp_path / "reference").as_posix(): path.read_text()
             for path in (tmp_path / "reference").rglob("*.md") if path.name != "SUMMARY.md"}
    documented = {re.search(r"^::: (\S+)$", text, re.M).group(1) for text in pages.values()}
    assert len(pages) == len(documented)
    assert documented == _importable_public_modules()
    summary = (tmp_path / "reference" / "SUMMARY.md").read_text()
    for page in pages:
        assert f"]({page})" in summary, f"{page} is not in the reference navigation"


def test_sphinx_roles_become_markdown():
    spec = importlib.util.spec_from_file_location("griffe_sphinx_roles", ROOT / "docs" / "griffe_sphinx_roles.py")
    roles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roles)
    convert = roles.markdown_roles
    assert convert(":class:`~sentio_lab.env.TradingEnv` steps") == "[`TradingEnv`][sentio_lab.env.TradingEnv] steps"
    assert (convert(":func:`sentio_lab.env.costs.execute`")
            == "[`sentio_lab.env.costs.execute`][sentio_lab.env.costs.execute]")
    assert convert(":meth:`~sentio_lab.env.TradingEnv.step()`") == "[`step`][sentio_lab.env.TradingEnv.step]"
    # relative and private targets cannot be resolved by the site: plain code, no link
    assert convert("see :data:`VARIANTS` and :func:`sentio_lab.data.quality._pct`") == (
        "see `VARIANTS` and `sentio_lab.data.quality._pct`")
    assert convert("``code`` and :py:mod:`sentio_lab.data`") == "``code`` and [`sentio_lab.data`][sentio_lab.data]"
