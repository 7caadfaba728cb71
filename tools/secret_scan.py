"""Scan the repository's tracked files for secrets with detect-secrets; exit 1 on any finding.

Skipped on purpose: tests/ and bench/bench_sanitize.py plant fake secrets (canaries), and
codex_ml/safety/rules.py holds the detection patterns themselves.
"""

import re
import subprocess
import sys

from detect_secrets import SecretsCollection
from detect_secrets.settings import default_settings

SKIP = re.compile(r"^(tests/|requirements.*\.lock$|bench/bench_sanitize\.py$|codex_ml/safety/rules\.py$)")


def main() -> int:
    files = [f for f in subprocess.run(["git", "ls-files"], capture_output=True, text=True,
                                       check=True).stdout.splitlines() if not SKIP.match(f)]
    secrets = SecretsCollection()
    with default_settings():
        for f in files:
            secrets.scan_file(f)
    found = [(f, s.type, s.line_number) for f in secrets.files for s in secrets[f]]
    for f, kind, line in found:
        print(f"{f}:{line}: {kind}")
    print(f"secret scan: {len(files)} tracked files, {len(found)} findings")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
