"""Regenerate README's spec reference table from the schema: ``python docs/update_readme.py``."""

import re
import sys
from pathlib import Path

from reid_deploy.spec import reference_table

README = Path(__file__).parents[1] / "README.md"
START, END = "<!-- spec-reference:start -->", "<!-- spec-reference:end -->"


def render(text: str) -> str:
    return re.sub(re.escape(START) + ".*?" + re.escape(END), f"{START}\n{reference_table()}\n{END}", text,
                  flags=re.S)


if __name__ == "__main__":
    current = README.read_text()
    README.write_text(render(current))
    sys.exit(0)
