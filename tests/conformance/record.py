"""Record the reference gateway's answers to the conformance cases.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install smg==1.13.0
    .venv/bin/python tests/conformance/record.py --reference /tmp/ref/bin/smg

writes tests/data/conformance_reference.json, which tests/test_conformance.py
replays against smg (CI does not need the reference installed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conformance.cases import run_all  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                   "conformance_reference.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="the reference's smg executable, in its own venv")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    # cwd "/": both packages are named smg, the checkout must not shadow the reference's
    results = run_all([args.reference, "launch"], cwd="/")
    with open(args.out, "w") as f:
        json.dump({"reference": "smg==1.13.0", "cases": results}, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"{len(results)} cases recorded in {args.out}")


if __name__ == "__main__":
    main()
