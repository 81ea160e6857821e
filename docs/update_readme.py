"""Regenerate README's spec reference (from the schema) and Performance section (from the newest full
``make bench`` result in bench/results): ``python docs/update_readme.py``."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
from bench.run import latest_full_report, readme_summary  # noqa: E402
from reid_deploy.spec import reference_table  # noqa: E402

README = Path(__file__).parents[1] / "README.md"


def _fill(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{body}\n{end}", text, flags=re.S)


def render(text: str) -> str:
    text = _fill(text, "spec-reference", reference_table())
    report = latest_full_report()
    return _fill(text, "performance", readme_summary(report)) if report else text


if __name__ == "__main__":
    current = README.read_text()
    README.write_text(render(current))
    sys.exit(0)
