"""Build `.make/typecheck/`: the installed layout of the `rlaif` package as a tree of file symlinks.

pyproject.toml maps `rlaif.judge` -> `judge/`, `rlaif.service` -> `service/`, ... through
`[tool.setuptools.package-dir]`, so the source tree itself has no `rlaif/judge/` folder and
neither mypy nor import-linter (grimp) can resolve `rlaif.judge` from it. This script
mirrors that mapping: real directories, one symlink per source file, so both tools read the
working tree's files (edits show up at once, error messages point at the real lines) under
their installed names. It is rebuilt from scratch on every run (a few milliseconds), so new
and deleted files are never stale. The same tree is what setuptools' `editable_mode=strict`
builds; doing it here keeps the developer's editable install untouched.

    python .ci/link_tree.py            # -> .make/typecheck/rlaif/{judge,service,...}, tests/, benchmarks/
    cd .make/typecheck && mypy -p rlaif && lint-imports --config ../../pyproject.toml
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".make" / "typecheck"
SUFFIXES = {".py", ".pyi", ".typed"}
ALSO = ("tests", "benchmarks")
"""Top-level folders linked as they are, so import-linter sees what they import (run it from OUT)."""


def main() -> None:
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    OUT.mkdir(parents=True, exist_ok=True)
    for child in OUT.iterdir():  # empty it in place: a shell may be standing in it
        if child.name not in (".mypy_cache", ".import_linter_cache"):
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    trees = [(package, folder) for package, folder in sorted(package_dirs.items())] + [(name, name) for name in ALSO]
    for package, folder in trees:
        source = ROOT / folder
        target = OUT.joinpath(*package.split("."))
        for path in sorted(source.rglob("*")):
            if path.suffix not in SUFFIXES or "__pycache__" in path.parts:
                continue
            relative = path.relative_to(source)
            if relative.parts and (ROOT / folder / relative.parts[0]).is_dir() and \
                    any(f"{package}.{relative.parts[0]}" == other for other in package_dirs):
                continue  # mapped separately (e.g. rlaif/judge would be `rlaif.judge`)
            link = target / relative
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    print(f"link tree of {len(package_dirs)} packages in {OUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
