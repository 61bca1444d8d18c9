"""Render tests/faults/results/last-run.json as the results table of docs/reliability.md.

    python tests/faults/report.py            # rewrite the table in docs/reliability.md
    python tests/faults/report.py --print    # only print it
"""

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "last-run.json"
DOC = HERE.parents[1] / "docs" / "reliability.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def table(results: dict) -> str:
    rows = ["| scenario | numbers from the last run | run at (UTC) |", "|---|---|---|"]
    for name in sorted(results, key=lambda n: (int(re.match(r"\d+", n).group()), n)):
        numbers = dict(results[name])
        at = numbers.pop("at")
        cells = ", ".join(f"{k}={v}" for k, v in sorted(numbers.items()))
        rows.append(f"| {name} | {cells} | {at} |")
    return "\n".join(rows)


def main() -> None:
    if not RESULTS.exists():
        sys.exit(f"no {RESULTS} yet: run the fault tests first (python -m pytest tests/faults)")
    text = table(json.loads(RESULTS.read_text()))
    if "--print" in sys.argv:
        print(text)
        return
    doc = DOC.read_text()
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
