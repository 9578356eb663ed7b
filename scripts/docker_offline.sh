#!/usr/bin/env bash
# What an air-gapped site needs to build the SecDFD image without a container registry or a
# package index inside the build (see the Dockerfile's build arguments):
#
#   bash scripts/docker_offline.sh base [IMAGE]   # a Python 3.11 base image from Debian's archive
#                                                 # (debootstrap, as root; default secdfd-base:bookworm)
#   bash scripts/docker_offline.sh wheels DIR     # every wheel the image installs, for Python 3.11
#                                                 # on x86_64 Linux (torch 2.13.0 CPU build)
#
# base: reuses IMAGE if the engine has it; otherwise imports the root file system tarball kept in
# the cache folder (SECDFD_DOCKER_CACHE, default ~/.cache/secdfd-docker), making it first with
# `debootstrap --variant=minbase` (SECDFD_DEBIAN_MIRROR, default deb.debian.org) when it is not there.
# wheels: `pip download` of torch==2.13.0, the project's dependencies (read from pyproject.toml) and
# setuptools (to build the project inside the image). torch comes from SECDFD_TORCH_INDEX (default
# the PyTorch CPU index, as an extra index next to pip's own configuration; set it empty to use
# only pip's configuration). A folder made before for the same requirements is left as it is.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

cache=${SECDFD_DOCKER_CACHE:-$HOME/.cache/secdfd-docker}
torch_req="torch==2.13.0"

base() {
  local image=${1:-secdfd-base:bookworm}
  if docker image inspect "$image" >/dev/null 2>&1; then
    echo "$image: already there"
    return
  fi
  tarball=$cache/bookworm-minbase-python3.tar
  if [[ ! -s $tarball ]]; then
    [[ $(id -u) -eq 0 ]] || { echo "debootstrap needs root" >&2; exit 1; }
    command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
    mkdir -p "$cache"
    root=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$root" "$tarball.tmp"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$root" "${SECDFD_DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$cache/debootstrap.log" 2>&1 \
      || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
    # what a container never needs: downloaded packages, package lists, documentation, translations
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
      "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/var/log/*.log \
      "$root"/var/cache/debconf/*-old
    tar -C "$root" --numeric-owner -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
  fi
  docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tarball" "$image" >/dev/null
  echo "$image: imported from $tarball"
}

wheels() {
  local dest=${1:?usage: docker_offline.sh wheels DIR}
  local py=${PYTHON:-python3}
  local deps
  deps=$("$py" -c 'import tomllib; print("\n".join(tomllib.load(open("'"$repo"'/pyproject.toml", "rb"))["project"]["dependencies"]))')
  local reqs
  reqs=$(printf '%s\n' "$torch_req" "$deps" "setuptools>=77" | grep -v '^torch$')
  local torch_index=${SECDFD_TORCH_INDEX-https://download.pytorch.org/whl/cpu}
  local stamp="$reqs"$'\n'"index: $torch_index"
  if [[ -f $dest/.requirements && $(cat "$dest/.requirements") == "$stamp" ]]; then
    echo "$dest: already made for these requirements"
    return
  fi
  # wheels only, for CPython 3.11 on any glibc Linux the base images have (bookworm: glibc 2.36)
  local platforms=()
  for v in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${v}_x86_64"); done
  platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
  mkdir -p "$dest"
  rm -f "$dest/.requirements"
  # shellcheck disable=SC2086
  "$py" -m pip download -q --dest "$dest" --only-binary=:all: --python-version 3.11 --implementation cp \
    --abi cp311 "${platforms[@]}" ${torch_index:+--extra-index-url "$torch_index"} $reqs
  ls "$dest"/torch-2.13.0* >/dev/null
  printf '%s' "$stamp" >"$dest/.requirements"
  echo "$dest: $(find "$dest" -name '*.whl' | wc -l) wheels, $(du -sh "$dest" | cut -f1); torch: $(basename "$dest"/torch-2.13.0*)"
}

case ${1:-} in
  base) shift; base "$@" ;;
  wheels) shift; wheels "$@" ;;
  *) sed -n '2,16p' "$0" >&2; exit 2 ;;
esac
