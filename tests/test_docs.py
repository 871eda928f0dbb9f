"""The README stays short and every link of the README and docs/ leads somewhere; the dvc plots templates are valid."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))


def test_the_readme_fits_two_screens_of_a_newcomer():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the detail goes to docs/"


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_every_local_link_leads_to_a_file(page):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    local = [link for link in links if "://" not in link]
    missing = [link for link in local if not (page.parent / link).exists()]
    assert not missing, f"{page.name} links to {missing}"


def test_the_readme_links_every_doc():
    readme = (ROOT / "README.md").read_text()
    assert [p.name for p in DOCS if f"docs/{p.name}" not in readme] == []


def test_the_plot_templates_are_vega_lite_with_dvc_anchors():
    names = set()
    for plot in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]:
        if isinstance(plot, dict):
            (spec,) = plot.values()
            names.add(spec.get("template", "linear"))
    custom = {p.stem for p in (ROOT / ".dvc" / "plots").glob("*.json")}
    assert names == custom, "dvc.yaml's plots use the custom templates in .dvc/plots/, each of them"
    for name in custom:
        text = (ROOT / ".dvc" / "plots" / f"{name}.json").read_text()
        spec = json.loads(text)
        assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite/")
        for anchor in ("<DVC_METRIC_DATA>", "<DVC_METRIC_X>", "<DVC_METRIC_Y>"):
            assert anchor in text, (name, anchor)
        assert '"zero": false' in text, f"{name}: an axis starting at 0 squeezes accuracies into a line"
