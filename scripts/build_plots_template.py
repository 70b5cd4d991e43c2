"""Build .dvc/plots/offline.html: DVC's plots page with vega, vega-lite and vega-embed inlined, so `dvc plots show`
renders without a network (DVC's own page loads them from a CDN). `.dvc/config` names it as `plots.html_template`.

The versions are the ones dvc-render's page asks for; the scripts come from their npm packages (`npm pack`), and
their licences are kept in the page. Run from the project root: `python scripts/build_plots_template.py`.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGES = {  # npm package → its minified browser build (the versions dvc-render's page loads)
    "vega@5.20.2": "package/build/vega.min.js",
    "vega-lite@5.2.0": "package/build/vega-lite.min.js",
    "vega-embed@6.18.2": "package/build/vega-embed.min.js",
}
OUTPUT = Path(".dvc/plots/offline.html")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- vega, vega-lite and vega-embed inlined by scripts/build_plots_template.py so the page works offline.
{licences}
    -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
        img {{
            max-width: 100%;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def main() -> int:
    scripts, licences = [], []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", "--silent", *PACKAGES], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        for spec, member in PACKAGES.items():
            name, version = spec.rsplit("@", 1)
            with tarfile.open(Path(tmp) / f"{name}-{version}.tgz") as tar:
                code = tar.extractfile(member).read().decode()
                licence = tar.extractfile("package/LICENSE").read().decode()
            if "</script" in code.lower() or "{plot_divs}" in code:
                raise SystemExit(f"{spec}: cannot be inlined as it is")
            scripts.append(f"    <script>/* {spec} */\n{code}\n    </script>")
            licences.append(
                f"    {spec}:\n" + "\n".join(f"      {line}" for line in licence.strip().splitlines())
            )
    page = PAGE.format(licences="\n".join(licences).replace("--", "- -"), scripts="\n".join(scripts))
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = OUTPUT.with_name(f".{OUTPUT.name}.tmp")
    tmp_out.write_text(page, encoding="utf-8")
    tmp_out.replace(OUTPUT)
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
