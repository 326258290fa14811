"""``make audit``: pip-audit of constraints.txt, with one clear verdict.

Runs ``pip-audit -r constraints.txt --no-deps --disable-pip --format json`` (every package is
pinned, so nothing is resolved or installed) and says which of three things happened:

* ``no known vulnerabilities`` in all N packages (exit 0);
* ``K known vulnerabilities`` in the packages named, with the fixed versions (exit 1);
* ``NO RESULT``: pip-audit failed, or packages could not be audited, typically because the
  vulnerability service (PyPI's JSON API, or OSV with ``AUDIT_SERVICE=osv``) is unreachable
  (exit 2; a partial audit names what it skipped and still reports what it found).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path


def main(argv: list[str]) -> int:
    requirements = argv[1] if len(argv) > 1 else "constraints.txt"
    service = argv[2] if len(argv) > 2 else "pypi"
    pip_audit = Path(sys.executable).with_name("pip-audit")
    command = [str(pip_audit), "-r", requirements, "--no-deps", "--disable-pip", "--format", "json",
               "--progress-spinner", "off", "--vulnerability-service", service]
    done = subprocess.run(command, capture_output=True, text=True)  # noqa: S603 - fixed argv
    try:
        report = json.loads(done.stdout)
    except ValueError:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        print(f"audit: NO RESULT: pip-audit failed (exit {done.returncode}, service {service}): "
              f"{lines[-1] if lines else 'no output'}")
        return 2
    packages = report.get("dependencies", [])
    skipped = [p for p in packages if p.get("skip_reason")]
    vulnerable = [p for p in packages if p.get("vulns")]
    found = sum(len(p["vulns"]) for p in vulnerable)
    audited = len(packages) - len(skipped)
    print(f"audit: {len(packages)} pinned packages in {requirements}; {audited} audited against "
          f"{service}, {len(skipped)} could not be audited")
    for package in vulnerable:
        for vuln in package["vulns"]:
            fixes = ", ".join(vuln.get("fix_versions") or []) or "none yet"
            print(f"  {package['name']}=={package['version']}: {vuln['id']} (fixed in: {fixes})")
    if skipped:
        reasons = Counter(p["skip_reason"].split(":")[0] for p in skipped)
        why = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common())
        print(f"  skipped: {why} (is the vulnerability service reachable from here?)")
    if found:
        print(f"audit: {found} known vulnerabilities in {len(vulnerable)} packages: "
              f"{', '.join(p['name'] for p in vulnerable)}")
        return 1
    if skipped:
        print(f"audit: NO RESULT for {len(skipped)} of {len(packages)} packages; no known "
              f"vulnerabilities in the {audited} audited")
        return 2
    print(f"audit: no known vulnerabilities in {len(packages)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
