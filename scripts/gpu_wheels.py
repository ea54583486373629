"""``make gpu-wheels``: the wheels bench/gpu_check.sh installs on an offline GPU machine, into bench/wheels/
(run from the repository root: ``python scripts/gpu_wheels.py``).

The machine has torch, lightning, transformers, tensorboard and torchmetrics (``HAVE``). pip resolves
scripts/gpu_requirements.txt for the machine's Python and platform (``pip install --dry-run --report``:
metadata only) and, separately, ``HAVE``; what the first needs and the second does not bring, minus torch
and the CUDA
libraries, is downloaded with ``pip download --no-deps``. If the machine's own copy of a shared dependency is
too old, ``pip install --no-index`` there says so (recorded in results/gpu.json) rather than fetching one.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HAVE = ["torch", "lightning", "transformers", "tensorboard", "torchmetrics"]
NEVER = re.compile(r"^(torch|triton|nvidia-.*|pytorch-triton.*)$")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _platform_args(python_version: str, platform: str) -> list[str]:
    return ["--only-binary=:all:", "--platform", platform, "--platform", "manylinux2014_x86_64",
            "--python-version", python_version, "--implementation", "cp"]


def resolve(requirements: list[str], plat: list[str]) -> dict[str, str]:
    """``{canonical name: version}`` of everything pip would install for ``requirements`` (nothing downloaded
    but metadata)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), "--target", str(Path(tmp) / "t"), *plat, *requirements]
        subprocess.run(cmd, check=True)
        items = json.loads(report.read_text())["install"]
    return {_canon(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_wheels.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="the GPU machine's Python, e.g. 3.11 (default: this one's)")
    p.add_argument("--platform", default="manylinux_2_28_x86_64", help="the GPU machine's wheel platform tag")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "wheels", help="where the wheels go")
    p.add_argument("--max-mib", type=float, default=None,
                   help="warn when the wheels pass this size (a limit on what can travel with the tree)")
    p.add_argument("--have", nargs="*", default=[],
                   help="more packages the machine already has (e.g. pyarrow pandas: pyarrow alone is ~50 "
                        "MiB)")
    args = p.parse_args(argv)
    plat = _platform_args(args.python_version, args.platform)
    reqs = [ln.strip() for ln in (ROOT / "scripts" / "gpu_requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    need, have = resolve(reqs, plat), resolve(HAVE + args.have, plat)
    fetch = {n: v for n, v in sorted(need.items()) if n not in have and not NEVER.match(n)}
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(args.out), *plat,
           *[f"{n}=={v}" for n, v in fetch.items()]]
    subprocess.run(cmd, check=True)
    sizes = {w.name: w.stat().st_size for w in sorted(args.out.glob("*.whl"))}
    total = sum(sizes.values()) / 2**20
    for name, size in sizes.items():
        print(f"{size / 2**20:8.1f} MiB  {name}")
    print(f"{total:8.1f} MiB  in {args.out} ({len(sizes)} wheels; left to the machine: "
          f"{', '.join(sorted(set(need) & set(have)))})")
    if args.max_mib is not None and total > args.max_mib:
        print(f"note: {total:.1f} MiB is more than --max-mib {args.max_mib:g}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
