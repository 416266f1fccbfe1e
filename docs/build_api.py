"""Builds the API reference (HTML) from the docstrings with pdoc: ``make docs``.

Every public module of the package gets a page, the layer packages (whose ``__all__`` lists only
their re-exported names) and their modules alike. Any warning pdoc raises (a name in ``__all__``
that does not resolve, a module that fails to import) is an error, so CI catches a broken page.
"""
from __future__ import annotations

import pathlib
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]


def public_modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "vpns_fast").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if not any(part.startswith("_") and part != "__init__" for part in parts):
            names.append(".".join(parts).removesuffix(".__init__"))
    names += [f"vpns_fast.kernels.{path.stem}" for path in sorted((ROOT / "kernels").glob("[a-z]*.py"))]
    names.append("vpns_fast.kernels")
    return sorted(names)  # a package before its modules, so walking it first covers what it lists


def main(out: str) -> int:
    import pdoc
    import pdoc.extract

    specs: list[str] = []
    covered: set[str] = set()
    for name in public_modules():
        if name == "vpns_fast" or name in covered:  # the top level's page would repeat the layers'
            continue
        specs.append(name)
        covered = set(pdoc.extract.walk_specs(specs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pdoc.pdoc(*specs, output_directory=pathlib.Path(out))
    pages = sorted(p.relative_to(out).as_posix() for p in pathlib.Path(out).rglob("*.html"))
    print(f"API reference: {len(pages)} pages in {out}/ (open {out}/index.html)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "build/api"))
