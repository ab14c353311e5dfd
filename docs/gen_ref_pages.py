"""Write the API reference pages at build time (run by the mkdocs-gen-files plugin, see mkdocs.yml).

The package is walked on disk, so the reference stays complete when modules move: one page per public module
(no path component with a leading underscore, which also leaves out ``__main__`` entry points), each rendered by
mkdocstrings from the module's docstrings, and ``reference/SUMMARY.md`` for mkdocs-literate-nav.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = "sentio_lab"
ROOT = Path(__file__).resolve().parent.parent


def public_modules(root: Path = ROOT, package: str = PACKAGE) -> list[str]:
    """Dotted names of the package's public modules and subpackages, sorted (the package itself first)."""
    names = []
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts):
            continue
        names.append(".".join(parts))
    return sorted(names)


def reference_path(module: str) -> Path:
    """The page of ``module`` under ``reference/``: packages get ``index.md`` so their modules nest beneath."""
    parts = module.split(".")
    is_package = (ROOT.joinpath(*parts) / "__init__.py").exists()
    return Path(*parts, "index.md") if is_package else Path(*parts[:-1], f"{parts[-1]}.md")


def write_reference() -> None:
    """Write one page per public module and the literate-nav summary into the build's virtual files."""
    import mkdocs_gen_files

    nav = mkdocs_gen_files.Nav()
    for module in public_modules():
        page = reference_path(module)
        nav[tuple(module.split("."))] = page.as_posix()
        with mkdocs_gen_files.open(Path("reference", page), "w") as handle:
            handle.write(f"# `{module}`\n\n::: {module}\n")
    with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as handle:
        handle.writelines(nav.build_literate_nav())


if __name__ == "<run_path>":  # executed by mkdocs-gen-files (runpy.run_path), not when imported by the tests
    write_reference()
