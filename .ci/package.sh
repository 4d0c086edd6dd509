#!/usr/bin/env bash
# Packaging check: build the sdist and the wheel, `twine check --strict` them, install the wheel into a fresh
# venv (CPU torch first) and import it from outside the repository, then type-check with mypy.
# Exits non-zero on the first failure. Slow (a fresh venv downloads the dependencies): not part of pytest.
#   bash .ci/package.sh
#   KEEP_TMP=1 bash .ci/package.sh   # keep the temporary directory (dist/, venv/) for inspection
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
TORCH_SPEC="torch==2.13.0"   # the CPU build (on the find-links path); a bare `torch` would pull CUDA wheels

tmp="$(mktemp -d)"
if [[ -z "${KEEP_TMP:-}" ]]; then trap 'rm -rf "$tmp"' EXIT; else echo "package: keeping $tmp"; fi
step() { printf '\n== package: %s\n' "$*"; }

expected="$(python - <<'PY'
import re
text = open("peft_abmll/_version.py").read()
match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.M)
if not match:
    raise SystemExit("package: no __version__ = '...' line in peft_abmll/_version.py")
print(match.group(1))
PY
)"
echo "package: version in peft_abmll/_version.py: $expected"

step "tools (build, twine, mypy)"
python -m pip install --quiet build twine mypy

step "copy the source tree (tracked + untracked, minus .gitignore'd files) to build from"
mkdir -p "$tmp/src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
        | xargs -0 cp --parents -t "$tmp/src"
else
    cp -r . "$tmp/src"
fi

step "python -m build (sdist, then the wheel from the sdist)"
python -m build --outdir "$tmp/dist" "$tmp/src"
sdist=("$tmp"/dist/*.tar.gz)
wheel=("$tmp"/dist/*.whl)
[[ ${#sdist[@]} -eq 1 && -f "${sdist[0]}" && ${#wheel[@]} -eq 1 && -f "${wheel[0]}" ]] \
    || { echo "package: expected one sdist and one wheel in $tmp/dist"; ls -l "$tmp/dist"; exit 1; }
ls -l "$tmp/dist"

step "twine check --strict"
python -m twine check --strict "${sdist[0]}" "${wheel[0]}"

step "wheel contents"
python - "${wheel[0]}" "$expected" <<'PY'
import sys, zipfile
wheel, expected = sys.argv[1], sys.argv[2]
names = zipfile.ZipFile(wheel).namelist()
errors = []
if f"peft_abmll-{expected}-" not in wheel.rsplit("/", 1)[-1]:
    errors.append(f"wheel file name does not carry version {expected}: {wheel}")
if "peft_abmll/py.typed" not in names:
    errors.append("peft_abmll/py.typed missing (PEP 561 marker)")
if not any(n.startswith("peft_abmll/tuner/") for n in names) or not any(n.startswith("peft_abmll/meta/") for n in names):
    errors.append("subpackages peft_abmll.tuner / peft_abmll.meta missing")
stray = sorted({n.split("/", 1)[0] for n in names if not n.startswith(("peft_abmll/", "peft_abmll-"))})
if stray:
    errors.append(f"unexpected top-level entries in the wheel: {stray}")
entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
text = zipfile.ZipFile(wheel).read(entry_points[0]).decode() if entry_points else ""
if "abmll = peft_abmll.cli:main" not in text:
    errors.append("console script `abmll = peft_abmll.cli:main` not declared in entry_points.txt")
if errors:
    sys.exit("package: bad wheel:\n  " + "\n  ".join(errors))
print(f"package: {len(names)} files in the wheel, py.typed and the abmll entry point present")
PY

step "fresh venv: $TORCH_SPEC first, then the wheel"
python -m venv "$tmp/venv"
venv_py="$tmp/venv/bin/python"
"$venv_py" -m pip install --quiet --upgrade pip
"$venv_py" -m pip install --quiet "$TORCH_SPEC"
if "$venv_py" -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
    echo "package: CUDA packages were installed with torch; the CPU build was expected"; exit 1
fi
"$venv_py" -m pip install --quiet "${wheel[0]}"
"$venv_py" -m pip check

step "import from outside the repository"
cd "$tmp"
got="$("$venv_py" -c "import peft_abmll, peft; print(peft_abmll.__version__)" | tail -n 1)"
where="$("$venv_py" -c "import peft_abmll; print(peft_abmll.__file__)")"
[[ "$where" == "$tmp/venv/"* ]] || { echo "package: peft_abmll imported from $where, not from the venv"; exit 1; }
[[ "$got" == "$expected" ]] || { echo "package: installed version $got != $expected"; exit 1; }
echo "package: import OK, version $got, from $where"
"$tmp/venv/bin/abmll" --help >/dev/null || { echo "package: the abmll console script fails"; exit 1; }
echo "package: abmll --help OK"
cd "$repo"

step "mypy peft_abmll"
python -m mypy peft_abmll --cache-dir "${MYPY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/peft-abmll-mypy}"

echo
echo "package: all checks passed"
