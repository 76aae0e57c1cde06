"""The dashboard works offline: its page, script and chart library are inside the wheel, not on a CDN."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_the_wheel_ships_the_page_and_its_chart_library(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("lemonade_inferos-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    static = "lemonade_inferos/dashboard/static/"
    for name in ("index.html", "dashboard.js", "dashboard.css", "vendor/uPlot.iife.min.js", "vendor/uPlot.min.css",
                 "vendor/uPlot.LICENSE"):
        assert static + name in names


def test_the_page_loads_nothing_from_another_origin():
    static = ROOT / "lemonade_inferos" / "dashboard" / "static"
    for path in (static / "index.html", static / "dashboard.js", static / "dashboard.css"):
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", path.read_text()), path
