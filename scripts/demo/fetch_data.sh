#!/usr/bin/env bash
# Fetches the demo's domain text from Debian packages (docs/ARCHITECTURE.md §9) into CACHE/data:
# `apt-get download` + `dpkg-deb -x`, nothing installed. Cached: a second run does nothing.
#   public    fortunes                 English quotations and jokes
#   code      libpython3.11-stdlib     the Python standard library
#   math      metamath-databases       set.mm, formal mathematics
#   scripture bible-kjv-text           the King James Bible (decompressed with bible-kjv's own
#                                      `bible` program, extracted from its package, not installed)
# With `large` (bench/reproduce.sh) into CACHE/data-large, public also holds dict-gcide's dictionary
# (tens of MB of English).
# Also the operator's public proxy text for router tuning (CACHE/data*/proxy): python3-docutils'
# source, metamath's iset.mm, and the World English Bible's deuterocanonical books
# (sword-text-web, read with `diatheke` and libsword from their packages, not installed).
set -euo pipefail
cache=${1:?usage: fetch_data.sh CACHE_DIR [large]}
size=${2:-}
[[ -z $size || $size == large ]] || { echo "fetch_data.sh: the second argument is 'large' or nothing" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
data=$cache/data${size:+-$size}
version=3  # bump when the preparation changes
if [[ -f $data/domains.json && "$(cat "$data/.version" 2>/dev/null)" == "$version" ]]; then
  echo "domain text cached in $data"
  exit 0
fi
debs=$cache/debs
mkdir -p "$debs"
packages=(fortunes libpython3.11-stdlib metamath-databases bible-kjv-text bible-kjv
  python3-docutils sword-text-web diatheke libsword1.9.0 libsword-common libclucene-core1v5)
[[ -z $size ]] || packages+=(dict-gcide)
missing=()
for p in "${packages[@]}"; do
  compgen -G "$debs/${p}_*.deb" >/dev/null || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "downloading ${missing[*]} (apt-get download)"
  # apt's sandbox user cannot write to a root-owned cache; download as root when we are root.
  (cd "$debs" && apt-get download -o APT::Sandbox::User=root "${missing[@]}" >/dev/null) || {
    echo "fetch_data.sh: apt-get download failed; check the network and the apt sources, then run again" >&2
    exit 1
  }
fi
root=$cache/extracted
rm -rf "$root" && mkdir -p "$root"
for p in "${packages[@]}"; do dpkg-deb -x "$(compgen -G "$debs/${p}_*.deb" | head -1)" "$root"; done
"$root/usr/bin/bible" -f -p "$root/usr/lib" 'gen1:1-rev22:21' >"$root/kjv.txt"
[[ -s $root/kjv.txt ]] || { echo "fetch_data.sh: could not decompress the KJV text" >&2; exit 1; }
for books in "Tobit 1:1-Bel 1:42" "I Maccabees 1:1-II Maccabees 15:39"; do
  LD_LIBRARY_PATH=$root/usr/lib/x86_64-linux-gnu SWORD_PATH=$root/usr/share/sword \
    "$root/usr/bin/diatheke" -b engWEB2015eb -f OSIS -k "$books"
done >"$root/web.txt"
[[ $(wc -c <"$root/web.txt") -gt 100000 ]] || { echo "fetch_data.sh: could not read the World English Bible with diatheke" >&2; exit 1; }
rm -rf "$data.tmp"
/usr/bin/python3 "$here/prepare_data.py" "$root" "$root/kjv.txt" "$root/web.txt" "$data.tmp" ${size:+--$size}
echo "$version" >"$data.tmp/.version"
rm -rf "$data" && mv "$data.tmp" "$data"
rm -rf "$root"
