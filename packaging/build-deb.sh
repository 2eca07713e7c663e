#!/bin/bash
# packaging/build-deb.sh - build hostdevd's Debian package (for Debian 13 "trixie") from this
# checkout, on Debian 12 or 13, as root (it installs missing build dependencies with apt-get):
#
#   packaging/build-deb.sh          -> dist/hostdevd_<version>_all.deb, then lintian
#
# The build runs in a temporary copy of the checkout (the files git tracks plus untracked,
# not ignored ones: uncommitted work is built, caches and .venv are not), so the tree stays
# clean. Niced, one job at a time. dist/ gets the .deb, .buildinfo, .changes and lintian.txt.
#
# Debian 12's python3-pydantic is 1.x, and the man page and hook generators import hostdevd,
# which needs pydantic 2: without it in Debian's python3 the script uses the checkout's
# .venv/bin/python (./setup.sh makes it) and the build profile pkg.hostdevd.venv (see
# debian/control); HOSTDEVD_GEN_PYTHON=/path/to/python chooses another one.
#
# Environment: KEEP_BUILD_DIR=1 keeps the temporary build directory.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

# Debian's tools and Debian's python3, whatever the caller's PATH has (pyenv, a venv, ~/.local).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP VIRTUAL_ENV PYENV_VERSION PIP_REQUIRE_VIRTUALENV || true
export LC_ALL=C.UTF-8
export DEB_BUILD_OPTIONS="parallel=1${DEB_BUILD_OPTIONS:+ $DEB_BUILD_OPTIONS}"

say() { echo "[build-deb] $*"; }
die() { echo "[build-deb] error: $*" >&2; exit 1; }

[ -f debian/control ] && [ -f debian/changelog ] || die "run from a hostdevd checkout (no debian/ in $repo)"

# ------------------------------------------------------------------ the generators' Python
has_pydantic2='import sys, lxml, pydantic; sys.exit(int(pydantic.VERSION.split(".")[0]) < 2)'
profiles=""
if [ -n "${HOSTDEVD_GEN_PYTHON:-}" ]; then
    gen_python=$HOSTDEVD_GEN_PYTHON
    "$gen_python" -c "$has_pydantic2" 2>/dev/null || die "HOSTDEVD_GEN_PYTHON=$gen_python has no pydantic 2 and lxml"
    profiles=pkg.hostdevd.venv
    say "man pages and hook generated with $gen_python (HOSTDEVD_GEN_PYTHON), build profile $profiles"
elif /usr/bin/python3 -c "$has_pydantic2" 2>/dev/null; then
    gen_python=python3
    say "man pages and hook generated with Debian's python3 (it has pydantic 2)"
elif [ -x .venv/bin/python ] && .venv/bin/python -c "$has_pydantic2" 2>/dev/null; then
    gen_python=$repo/.venv/bin/python
    profiles=pkg.hostdevd.venv
    have=$(/usr/bin/python3 -c 'import pydantic; print("pydantic", pydantic.VERSION)' 2>/dev/null || echo "no pydantic")
    say "Debian's python3 has $have, the generators need pydantic 2:"
    say "falling back to $gen_python, build profile $profiles"
else
    die "the man page and hook generators need a Python with pydantic 2 and lxml: Debian's python3 has none" \
        "(Debian 12 ships pydantic 1.x). Run ./setup.sh (it creates .venv), set HOSTDEVD_GEN_PYTHON, or build on Debian 13."
fi

# ------------------------------------------------------------------ build dependencies
pkgs=(build-essential dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools
      python3-wheel python3-docutils python3-argparse-manpage lintian)
[ -z "$profiles" ] && pkgs+=(python3-pydantic python3-lxml)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing build dependencies (install them as root): ${missing[*]}"
    say "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive nice -n 19 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Whatever debian/control says (versions, the profile's choices), checked before anything runs.
dpkg-checkbuilddeps ${profiles:+-P"$profiles"} || die "build dependencies not satisfied (above)"

# ------------------------------------------------------------------ a clean copy
version=$(dpkg-parsechangelog -S Version)
upstream=${version%-*}
work=$(mktemp -d /tmp/hostdevd-deb.XXXXXX)
cleanup() {
    if [ "${KEEP_BUILD_DIR:-0}" = 1 ] || [ "${ok:-0}" != 1 ]; then
        say "build directory kept: $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
src=$work/hostdevd-$upstream
mkdir -p "$src"
if command -v git >/dev/null && git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$repo" ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do
            if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi   # not tracked-but-deleted ones
        done |
        tar --null -T - -cf - | tar -xf - -C "$src"
else
    tar --exclude=.git --exclude=.venv --exclude=dist --exclude=build --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude='.*_cache' --exclude=.hypothesis --exclude=.lab -cf - . | tar -xf - -C "$src"
fi
say "building hostdevd $version in $src"

# The source package too, from the pristine copy, only for lintian: the checks of debian/
# (control, copyright, rules, changelog) are source checks.
tar -C "$work" --exclude="hostdevd-$upstream/debian" -cJf "$work/hostdevd_$upstream.orig.tar.xz" "hostdevd-$upstream"
(cd "$work" && nice -n 19 dpkg-source -b "hostdevd-$upstream") >"$work/source.log" 2>&1 ||
    { cat "$work/source.log"; die "dpkg-source -b failed"; }

# ------------------------------------------------------------------ build
(cd "$src" && HOSTDEVD_GEN_PYTHON=$gen_python nice -n 19 \
    dpkg-buildpackage -us -uc -b ${profiles:+--build-profiles="$profiles"}) 2>&1 | tee "$work/build.log" ||
    die "dpkg-buildpackage failed (log: $work/build.log)"

arch=all
deb=$work/hostdevd_${version}_${arch}.deb
changes=$(ls "$work"/hostdevd_"${version}"_*.changes)
[ -f "$deb" ] || die "no $deb"

mkdir -p "$repo/dist"
cp "$deb" "$changes" "$work"/hostdevd_"${version}"_*.buildinfo "$repo/dist/"

# ------------------------------------------------------------------ lintian
say "lintian $(lintian --version | awk '{print $2}') on the binary and the source package:"
set +e
nice -n 19 lintian --display-info --fail-on error,warning "$changes" "$work/hostdevd_${version}.dsc" \
    2>&1 | tee "$repo/dist/lintian.txt"
lintian_rc=${PIPESTATUS[0]}
set -e
[ -s "$repo/dist/lintian.txt" ] || echo "(no tags)" >"$repo/dist/lintian.txt"
[ "$lintian_rc" = 0 ] || die "lintian found errors or warnings (dist/lintian.txt)"

ok=1
say "lintian: no errors, no warnings"
say "built: dist/$(basename "$deb")"
