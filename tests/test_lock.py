"""The conda environment pins the same versions as the pip lock (constraints.txt)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            pins[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    return pins


def test_environment_yml_pins_match_the_lock() -> None:
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pinned: dict[str, str] = {}
    for entry in environment["dependencies"]:
        for spec in entry["pip"] if isinstance(entry, dict) else [entry]:
            name, _, version = re.split(r"(==|=)", spec, maxsplit=1) if "=" in spec else (spec, "", "")
            if version and name != "python":
                pinned[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    lock = _lock()
    assert len(pinned) >= 15
    assert {name: version for name, version in pinned.items() if lock.get(name) != version} == {}
