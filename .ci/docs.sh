#!/usr/bin/env bash
# Build the documentation site offline and strictly: `mkdocs build --strict` (every warning is an error),
# then check that no page loads anything (script, stylesheet, font) from the network, and, when node is
# available, that every formula on the site parses in MathJax. Exit non-zero on any failure.
#   bash .ci/docs.sh            # build into a temporary directory, removed afterwards
#   SITE_DIR=site bash .ci/docs.sh   # keep the built site
set -euo pipefail
cd "$(dirname "$0")/.."

# The docs dependencies: the `docs` extra of pyproject.toml when it is declared, else the same list here.
mapfile -t DOCS_REQS < <(python - <<'PY'
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
extras = tomllib.load(open("pyproject.toml", "rb")).get("project", {}).get("optional-dependencies", {})
reqs = extras.get("docs") or [
    "mkdocs>=1.6",
    "mkdocs-material>=9.6",
    "mkdocstrings[python]>=1.0",
    "mkdocstrings-python>=2.0",
    "django-static-mathjax>=3.2",
]
print("\n".join(reqs))
PY
)
python -m pip install --quiet "${DOCS_REQS[@]}"

if [[ -n "${SITE_DIR:-}" ]]; then
    site="$SITE_DIR"
else
    site="$(mktemp -d)"
    trap 'rm -rf "$site"' EXIT
fi
export NO_MKDOCS_2_WARNING=1  # Material's banner about MkDocs 2.0 (not a build warning)
mkdocs build --strict --site-dir "$site"

# Offline rendering: no page may pull a script, stylesheet, image or font from another host.
python - "$site" <<'PY'
import pathlib, re, sys
remote = re.compile(r"""<(?:script|img|iframe)\b[^>]*\bsrc=["']?(?:https?:)?//|<link\b[^>]*\bhref=["']?(?:https?:)?//[^>]*>|@import\s+url\(["']?(?:https?:)?//|url\(["']?(?:https?:)?//""", re.I)
bad = []
for page in pathlib.Path(sys.argv[1]).rglob("*"):
    if page.suffix in (".html", ".css") and remote.search(page.read_text(errors="replace")):
        for m in remote.finditer(page.read_text(errors="replace")):
            if page.suffix == ".css" or 'rel="canonical"' not in m.group(0):
                bad.append(f"{page}: {m.group(0)[:120]}")
if bad:
    sys.exit("docs: pages load remote resources (the site must render offline):\n" + "\n".join(sorted(set(bad))))
PY

# Every formula parses (MathJax errors do not fail the mkdocs build). Needs node; skipped without it.
if command -v node >/dev/null 2>&1; then
    mathjax_dir="$(python -c 'import importlib.util as u, pathlib; print(pathlib.Path(next(iter(u.find_spec("mathjax").submodule_search_locations))) / "static/mathjax/es5")')"
    python - "$site" > "$site/.formulas.json" <<'PY'
import html, json, pathlib, re, sys
items = []
for page in pathlib.Path(sys.argv[1]).rglob("*.html"):
    for m in re.finditer(r'<(span|div) class="arithmatex">(.*?)</\1>', page.read_text(), re.S):
        tex = html.unescape(m.group(2)).strip()
        items.append({"page": str(page), "tex": tex[2:-2], "display": tex.startswith("\\[")})
print(json.dumps(items))
PY
    FORMULAS="$site/.formulas.json" MATHJAX_DIR="$mathjax_dir" node - <<'JS'
const items = require(process.env.FORMULAS);
require(process.env.MATHJAX_DIR + "/node-main.js").init({loader: {load: ["input/tex", "output/svg"]}}).then((MathJax) => {
  const bad = items.filter((it) => {
    const svg = MathJax.startup.adaptor.outerHTML(MathJax.tex2svg(it.tex, {display: it.display}));
    return /merror|data-mjx-error|"red"/.test(svg);  // parse errors; undefined macros are drawn in red
  });
  bad.forEach((it) => console.error(`docs: formula does not parse in ${it.page}: ${it.tex}`));
  console.log(`docs: ${items.length} formulas checked, ${bad.length} with errors`);
  process.exit(bad.length ? 1 : 0);
}).catch((e) => { console.error(e); process.exit(1); });
JS
else
    echo "docs: node not found, formula check skipped"
fi
echo "docs: built OK"
