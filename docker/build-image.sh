#!/usr/bin/env bash
# Build a persona-server image with docker when an engine answers, else with buildah:
#   docker/build-image.sh DOCKERFILE IMAGE
#
# BASE_IMAGE (default: the Dockerfile's) is used when it is present or can be pulled; when no
# registry answers, a stand-in is made locally with debootstrap from the Debian mirror apt uses
# (STANDIN_SUITE, default bookworm, whose python3 is 3.11; STANDIN=0 forbids the stand-in).
# pip's certificate bundle and wheel directories, as pip on this host is configured (config
# files, or PIP_CERT / PIP_FIND_LINKS in the environment), become the build arguments PIP_CERT
# and PIP_FIND_LINKS; buildah mounts them read-only at the same paths. An http(s) index-url and
# no-index pass through as PIP_INDEX_URL and PIP_NO_INDEX. TORCH_INDEX_URL, when set (even
# empty), overrides the Dockerfile's; EXTRA_BUILD_ARGS is passed on as is ("--build-arg X=y").
set -euo pipefail

usage="usage: build-image.sh DOCKERFILE IMAGE"
dockerfile=${1:?$usage}
image=${2:?$usage}
context=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
suite=${STANDIN_SUITE:-bookworm}
base=${BASE_IMAGE:-$(sed -n 's/^ARG BASE_IMAGE=//p' "$dockerfile" | head -n1)}

if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  engine=docker
elif command -v buildah >/dev/null; then
  engine=buildah
else
  echo "build-image: no docker engine answers and buildah is missing" >&2
  exit 1
fi

# pip's effective value of a setting: the environment (listed as :env:) wins over config files.
pip_setting() {
  local listed
  listed=$("$python" -m pip config list 2>/dev/null || true)
  { grep "^:env:\.$1=" <<<"$listed" || true; grep "\.$1=" <<<"$listed" || true; } \
    | head -n1 | sed "s/^[^=]*=//; s/^'//; s/'\$//"
}

image_exists() {
  if [ "$engine" = docker ]; then docker image inspect "$1" >/dev/null 2>&1
  else buildah inspect --type image "$1" >/dev/null 2>&1; fi
}

pull() {
  if [ "$engine" = docker ]; then timeout 300 docker pull -q "$1" >/dev/null 2>&1
  else timeout 300 buildah pull -q "$1" >/dev/null 2>&1; fi
}

# The Debian mirror apt is configured with (deb822 sources first, then sources.list).
debian_mirror() {
  local uri
  uri=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $3 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

# A minimal Debian with python, venv and useradd: what the Dockerfiles need of python:3.11-slim.
make_standin() {
  local name=localhost/persona-standin:$suite rootfs
  if image_exists "$name"; then echo "$name"; return; fi
  command -v debootstrap >/dev/null || { echo "build-image: debootstrap is missing" >&2; exit 1; }
  rootfs=$(mktemp -d)
  echo "build-image: no registry answers for $base; making $name with debootstrap" >&2
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    "$suite" "$rootfs" "$(debian_mirror)" >&2
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
  local changes=(--change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
                 --change "ENV LANG=C.UTF-8" --change 'CMD ["python3"]')
  if [ "$engine" = docker ]; then tar -C "$rootfs" -c . | docker import "${changes[@]}" - "$name" >/dev/null
  else tar -C "$rootfs" -c . | podman import "${changes[@]}" - "$name" >/dev/null; fi
  rm -rf "$rootfs"
  echo "$name"
}

if ! image_exists "$base" && ! pull "$base"; then
  if [ "${STANDIN:-1}" != 1 ]; then
    echo "build-image: $base can be neither found nor pulled, and a Debian stand-in cannot replace it" >&2
    exit 1
  fi
  base=$(make_standin)
fi

args=(--build-arg "BASE_IMAGE=$base")
mounts=()
cert=$(pip_setting cert)
find_links=$(pip_setting find-links)
reachable_links=()
for link in $find_links; do
  case $link in
    file://*) path=${link#file://} ;;
    *://*) reachable_links+=("$link"); continue ;;
    *) path=$link ;;
  esac
  [ -d "$path" ] && mounts+=(-v "$path:$path:ro") && reachable_links+=("$link")
done
if [ -n "$cert" ]; then
  cert=$(readlink -f "$cert")
  mounts+=(-v "$(dirname "$cert"):$(dirname "$cert"):ro")
fi
index_url=$(pip_setting index-url)
[[ $index_url == http*://* ]] && args+=(--build-arg "PIP_INDEX_URL=$index_url")
case $(pip_setting no-index) in 1|true|yes|on) args+=(--build-arg PIP_NO_INDEX=1) ;; esac
[ -n "${TORCH_INDEX_URL+set}" ] && args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
read -r -a extra <<<"${EXTRA_BUILD_ARGS:-}"

if [ "$engine" = docker ]; then
  # docker builds see no host paths: only URLs among the find-links reach the build.
  urls=()
  for link in "${reachable_links[@]}"; do [[ $link == *://* && $link != file://* ]] && urls+=("$link"); done
  [ ${#urls[@]} -gt 0 ] && args+=(--build-arg "PIP_FIND_LINKS=${urls[*]}")
  [ ${#mounts[@]} -gt 0 ] && echo "build-image: docker builds cannot mount $cert ${find_links}; serve" \
    "wheel directories over http (PIP_FIND_LINKS=http://...) or build with buildah" >&2
  echo "build-image: docker, base $base" >&2
  docker build -f "$dockerfile" -t "$image" "${args[@]}" "${extra[@]}" "$context"
else
  [ -n "$cert" ] && args+=(--build-arg "PIP_CERT=$cert")
  [ ${#reachable_links[@]} -gt 0 ] && args+=(--build-arg "PIP_FIND_LINKS=${reachable_links[*]}")
  echo "build-image: buildah, base $base, pip cert ${cert:-none}, find-links ${reachable_links[*]:-none}" >&2
  # chroot isolation and explicit ulimits: what builds inside an unprivileged container allow.
  # The docker format keeps HEALTHCHECK and STOPSIGNAL, which OCI image configs drop.
  buildah bud --isolation=chroot --ulimit nofile=20000:20000 --ulimit nproc=1000:1000 --layers \
    --format docker -f "$dockerfile" -t "$image" "${args[@]}" "${mounts[@]}" "${extra[@]}" "$context"
fi
