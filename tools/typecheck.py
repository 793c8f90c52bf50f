"""Run mypy on costserve under the module names it is installed with.

``pyproject.toml`` installs client/ as ``costserve``, server/ as ``costserve.server``
and client/v1 as ``costserve.v1``. mypy cannot read that mapping: given ``server/``
it would check a package named ``server``, and it does not follow the import hook of
an editable install. This script reads the packages and their folders from
``[tool.setuptools]``, hands mypy every module under its real name (a ``.pyi`` in
place of its ``.py``), and takes every other setting from ``[tool.mypy]``.

Usage::

    python tools/typecheck.py                      # the costserve packages
    python tools/typecheck.py protos/generate.py   # ... and these scripts too
    python tools/typecheck.py --no-incremental     # any mypy flag passes through

Exit status as mypy's: 0 clean, 1 errors, 2 a blocking error (a syntax error, say).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mypy import build
from mypy.errors import CompileError
from mypy.fscache import FileSystemCache
from mypy.main import process_options
from mypy.modulefinder import BuildSource, matches_exclude
from mypy.util import FancyFormatter, count_stats

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent


def package_dirs(pyproject: Path = REPO_ROOT / "pyproject.toml") -> dict[str, Path]:
    """Each package of ``[tool.setuptools] packages`` and the folder it is installed from.

    As setuptools does: the longest ``package-dir`` prefix of a package names its base
    folder, and the rest of the dotted name descends from there.
    """
    setuptools = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["setuptools"]
    mapping: dict[str, str] = setuptools.get("package-dir", {})
    folders = {}
    for package in setuptools["packages"]:
        parts = package.split(".")
        for cut in range(len(parts), -1, -1):
            prefix = ".".join(parts[:cut])
            if prefix in mapping:
                folders[package] = pyproject.parent / mapping[prefix] / Path(*parts[cut:])
                break
            if cut == 0:
                folders[package] = pyproject.parent / Path(*parts)
    return folders


def package_sources(folders: dict[str, Path]) -> list[BuildSource]:
    """One source per module of each package (not recursive: packages are listed one by one)."""
    sources = []
    for package, folder in sorted(folders.items()):
        stems = {path.stem: path for path in sorted(folder.glob("*.py"))}
        stems.update({path.stem: path for path in sorted(folder.glob("*.pyi"))})
        for stem, path in sorted(stems.items()):
            module = package if stem == "__init__" else f"{package}.{stem}"
            sources.append(BuildSource(str(path.relative_to(REPO_ROOT)), module))
    return sources


def main(argv: list[str]) -> int:
    flags = [arg for arg in argv if arg.startswith("-")]
    scripts = [str(Path(arg).resolve().relative_to(REPO_ROOT)) for arg in argv if not arg.startswith("-")]
    # From the repository root: pyproject.toml's [tool.mypy] applies, paths print relative to it.
    os.chdir(REPO_ROOT)
    fscache = FileSystemCache()
    # Options only: [tool.mypy] and the flags; the sources are ours.
    _, options = process_options(flags, require_targets=False, fscache=fscache)
    sources = [
        source
        for source in package_sources(package_dirs())
        if not matches_exclude(source.path or "", options.exclude, fscache, options.verbosity >= 2)
    ]
    sources += [BuildSource(script, Path(script).stem) for script in scripts]
    try:
        result = build.build(sources, options, fscache=fscache)
        messages, blocking = result.errors, False
    except CompileError as error:
        messages, blocking = error.messages, True
    formatter = FancyFormatter(sys.stdout, sys.stderr, options.hide_error_codes)
    for message in messages:
        print(formatter.colorize(message) if options.color_output else message)
    n_errors, n_notes, n_files = count_stats(messages)
    if n_errors:
        print(
            formatter.format_error(n_errors, n_files, len(sources), blockers=blocking, use_color=options.color_output)
        )
        return 2 if blocking else 1
    print(formatter.format_success(len(sources), options.color_output))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
