"""Make the tensorrt-stubs wheel readable by mypy.

tensorrt-stubs 10.13.0.35.1 (generated type stubs of the TensorRT Python API) installs its .pyi
files as the packages `tensorrt/` and `tensorrt_bindings/` without a py.typed marker, so mypy will
not read them, and the generator left syntax errors in them: parameters named `in`, and one
required parameter after defaulted ones. mypy stops at a syntax error in a stub.

This writes PEP 561 stub-only copies beside them, `tensorrt-stubs/` and `tensorrt_bindings-stubs/`,
with only those slips mended (every signature mypy can read is left as generated); mypy prefers
`*-stubs` packages on its own. Run it after installing tensorrt-stubs; it is idempotent.
"""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

FIXES = [
    (re.compile(r"\(self(: \w+)?, in: "), r"(self\1, in_: "),  # `in` is a keyword
    (re.compile(r"power: Weights = None, channel_axis: int\)"), "power: Weights = None, channel_axis: int = ...)"),
]


def main() -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    for package in ("tensorrt", "tensorrt_bindings"):
        src, dst = site / package, site / f"{package}-stubs"
        if not (src / "__init__.pyi").exists():
            raise SystemExit(f"{src}: no stubs here; install them first: pip install --no-deps tensorrt-stubs")
        dst.mkdir(exist_ok=True)
        for stub in src.glob("*.pyi"):
            text = stub.read_text()
            for pattern, replacement in FIXES:
                text = pattern.sub(replacement, text)
            (dst / stub.name).write_text(text)
    print(f"wrote tensorrt-stubs and tensorrt_bindings-stubs in {site}")


if __name__ == "__main__":
    main()
