"""Print pip constraints pinning every `>=X` floor of pyproject.toml to `==X`.

scripts/dev.sh installs these into .venv-floors and runs the demo on them, so a floor that
does not work fails CI. Read at run time: a dependency added later is covered without edits.
Extras are dropped from the names (`moto[server]` -> `moto`): pip constraints take no extras.
"""

import re
import sys
import tomllib
from pathlib import Path

_FLOOR = re.compile(r"^\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)")


def floors(pyproject: Path) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        specs.extend(extra)
    pins: dict[str, str] = {}
    for spec in specs:
        m = _FLOOR.match(spec)
        if m:
            name = m.group(1).lower().replace("_", "-")
            if pins.get(name, m.group(2)) != m.group(2):
                sys.exit(f"error: {name} has two floors in pyproject.toml ({pins[name]}, {m.group(2)})")
            pins[name] = m.group(2)
    return pins


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
    for name, version in sorted(floors(path).items()):
        print(f"{name}=={version}")
