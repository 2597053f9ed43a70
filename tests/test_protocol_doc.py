"""The worked examples in PROTOCOL.md must stay the golden frames."""
from __future__ import annotations

import json
import re

from harness import ROOT


def _hex_blocks_after(heading: str, text: str) -> list[str]:
    out = []
    for m in re.finditer(re.escape(heading) + r"[^\n]*\n\n```\n([0-9a-f\n]+)```", text):
        out.append(m.group(1).replace("\n", ""))
    return out


def test_worked_example_frames_are_golden_vectors() -> None:
    doc = (ROOT / "protocol" / "PROTOCOL.md").read_text()
    frames = {v["frame"] for v in json.loads((ROOT / "protocol" / "vectors" / "frames.json").read_text())["vectors"]}
    shown = _hex_blocks_after("Frame (", doc)
    assert len(shown) >= 4, "PROTOCOL.md lost its worked example frames"
    for h in shown:
        assert h in frames, f"PROTOCOL.md shows a frame that is not a golden vector: {h[:40]}..."


def test_every_error_code_has_a_name() -> None:
    # the names live apart from the codes (a board loads only the codes)
    from protocol import errors
    from protocol.errnames import NAMES

    codes = {v for k, v in vars(errors).items() if k == "OK" or k.startswith("E_")}
    assert codes == set(NAMES), codes ^ set(NAMES)
    assert str(errors.ProtocolError(errors.E_TAG, "forged")) == "tag (24): forged"


def test_error_code_table_matches_errors_py() -> None:
    from protocol.errnames import NAMES

    doc = (ROOT / "protocol" / "PROTOCOL.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| ([a-z_0-9]+) \|", doc, re.M))
    for code, name in NAMES.items():
        assert rows.get(str(code)) == name, f"error {code} ({name}) missing or different in PROTOCOL.md"
