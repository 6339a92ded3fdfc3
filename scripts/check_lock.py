"""Check that a virtual environment holds exactly what requirements.lock pins.

    .venv/bin/python scripts/check_lock.py [--lock requirements.lock]     (or: make check-lock)

Runs `pip freeze --all` with this interpreter and compares every installed distribution with the
lock: each one must be pinned there, at the version installed. Packages of the lock that are not
installed are fine (`make run` installs only the runtime part; `make test` adds the dev tools).
pip itself is not a dependency and the project (editable install) is not in the lock; both are
ignored. Anything else (an unpinned extra package, another version, an editable or URL install)
is printed, one line each, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALWAYS_IGNORED = frozenset({"pip"})

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;\\#]+)")


def normalize(name: str) -> str:
    """PEP 503 name: case, '-', '_' and '.' do not matter (ruamel.yaml == ruamel-yaml)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> dict[str, str]:
    """{normalized name: version} of a pip-compile output (comments, hashes, markers skipped)."""
    pins: dict[str, str] = {}
    for line in text.splitlines():
        if (match := _PIN.match(line.strip())) and not line[:1].isspace():
            pins[normalize(match.group(1))] = match.group(2)
    return pins


def compare(freeze: Iterable[str], lock: dict[str, str], ignore: Iterable[str] = ()) -> list[str]:
    """Every way the `pip freeze` lines differ from the lock's pins; [] when they agree."""
    ignored = {normalize(n) for n in (*ALWAYS_IGNORED, *ignore)}
    problems: list[str] = []
    editable = ""  # the name pip's comment gives to the `-e <path>` line that follows it
    for raw in freeze:
        line = raw.strip()
        if line.startswith("#"):  # "# Editable install with no version control (name==1.0)"
            editable = m.group(1) if (m := re.search(r"\(([^()=\s]+)==[^()]*\)$", line)) else ""
            continue
        if not line:
            continue
        if match := _PIN.match(line):
            name, version = normalize(match.group(1)), match.group(2)
            if name in ignored:
                continue
            if name not in lock:
                problems.append(f"{line}: installed, but requirements.lock does not pin it")
            elif lock[name] != version:
                problems.append(f"{line}: requirements.lock pins {name}=={lock[name]}")
            continue
        if line.startswith("-e "):  # "-e /path" or "-e git+URL@commit#egg=name"
            egg = re.search(r"[#&]egg=([A-Za-z0-9._-]+)", line)
            name = egg.group(1) if egg else editable
        else:  # "name @ URL": a direct URL or local file install
            name = re.split(r"[\s@\[]", line, maxsplit=1)[0]
        if normalize(name) not in ignored:
            problems.append(f"{line}: not an index install of a version the lock pins")
        editable = ""
    return problems


def project_name(root: Path = ROOT) -> str:
    return str(tomllib.loads((root / "pyproject.toml").read_text())["project"]["name"])


def pip_freeze(python: str = sys.executable) -> list[str]:
    out = subprocess.run(
        [python, "-m", "pip", "freeze", "--all"], check=True, capture_output=True, text=True
    ).stdout
    return out.splitlines()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--lock", type=Path, default=ROOT / "requirements.lock")
    args = parser.parse_args(argv)
    lock = parse_lock(args.lock.read_text())
    freeze = pip_freeze()
    ignore = {normalize(n) for n in (*ALWAYS_IGNORED, project_name())}
    problems = compare(freeze, lock, ignore=ignore)
    for problem in problems:
        print(f"check_lock: {problem}", file=sys.stderr)
    if problems:
        print(
            f"check_lock: {len(problems)} installed package(s) differ from {args.lock.name}; "
            "rebuild the environment (rm -rf .venv && make run) or regenerate it (make lock)",
            file=sys.stderr,
        )
        return 1
    pins = [m.group(1) for line in freeze if (m := _PIN.match(line.strip()))]
    n = sum(1 for name in pins if normalize(name) not in ignore)
    print(f"check_lock: the {n} installed packages match {args.lock.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
