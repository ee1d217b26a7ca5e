"""The repository stands alone: a user's clone has nothing beside it, so nothing here may reach outside it."""

import re
import subprocess
from pathlib import Path

from tests.helpers import ROOT

# What code or docs would write to leave the clone: the project's old shared folder, or the clone's parent.
OUTSIDE = re.compile(r"\.\./shared|ROOT\.parent|parents\[2\]|parent\s*/\s*[\"']shared")
LINK = re.compile(r"\]\((?!https?://|mailto:|#)([^)\s]+)\)")


def tracked() -> list:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_reaches_outside_the_repository():
    offenders = []
    for path in tracked():
        if path.suffix in (".png", ".json", ".lock") or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in OUTSIDE.finditer(text)]
    assert offenders == []


def test_relative_links_in_the_docs_lead_to_files_of_the_repository():
    broken = []
    for doc in [p for p in tracked() if p.suffix == ".md"]:
        for target in LINK.findall(doc.read_text("utf-8")):
            resolved = (doc.parent / target.split("#")[0]).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_the_contract_and_the_original_document_are_kept_here():
    contract = (ROOT / "docs" / "API.md").read_text("utf-8")
    assert "original-api-doc.zh.md" in contract and "Version 1.1" in contract
    assert "```python" in (ROOT / "docs" / "original-api-doc.zh.md").read_text("utf-8")
    assert Path(ROOT / "README.md").read_text("utf-8").count("(docs/API.md)") >= 1
