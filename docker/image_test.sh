#!/bin/sh
# make image-test: build the image and run it for real, as a user would.
#
#   sh docker/image_test.sh [IMAGE]          (IMAGE defaults to ddtool:cpu)
#
# Builds the Dockerfile with docker when a Docker engine answers, else with podman; ENGINE=docker
# or ENGINE=podman forces one. Then runs, inside the image as a non-root user of the host,
# `inspect`, `distill --export onnx` on the embedded sample and `predict` with the exported file,
# and checks on the host that every file the container wrote belongs to that user and is readable
# by others (umask 022, the engines' default), and that the predictions are right.
#
# podman only, for machines without a registry or a fast network:
# - when the Dockerfile's base image cannot be pulled, a stand-in with the same Debian release and
#   its python3 is made with debootstrap (root only) from the mirror apt uses, and kept as
#   localhost/debian-py:RELEASE for the next run;
# - the build sees the host's pip settings: a CPU torch wheel of the pinned version lying in a
#   find-links folder is installed instead of downloading one, and pip's CA bundle (a proxy's) is
#   trusted. They are mounted as the build's home folder, so nothing of them stays in the image;
# - where the VM forbids a container to raise its ulimits, containers get podman's own.
#
# As root, the container runs as IMAGE_TEST_USER (default 1000:1000) on a folder owned by it.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
image=${1:-ddtool:cpu}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
logs=$root/build/image-test  # the build's and the run's output, kept
mkdir -p "$logs"

die() { echo "image-test: error: $*" >&2; exit 1; }
say() { echo "image-test: $*"; }
dockerfile_arg() { sed -n "s/^ARG $1=//p" "$root/Dockerfile"; }
# A pip setting as pip itself resolves it: its PIP_* variable, else its configuration files.
pip_setting() {
    value=$(printenv "PIP_$(echo "$1" | tr a-z- A-Z_)" || true)
    [ -n "$value" ] || value=$(python3 -m pip config list 2>/dev/null | sed -n "s/^[a-z]*\.$1='\(.*\)'\$/\1/p" | tail -n 1)
    echo "$value"
}

engine=${ENGINE:-}
if [ -z "$engine" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
    elif command -v podman >/dev/null; then engine=podman
    else die "no Docker engine answers and podman is not installed (apt-get install podman)"; fi
fi
base=${PYTHON_IMAGE:-$(dockerfile_arg PYTHON_IMAGE)}
torch_version=$(dockerfile_arg TORCH_VERSION)
set -- # the build's extra options, collected in "$@"

if [ "$engine" = podman ]; then
    if ! podman image exists "$base" && ! podman pull -q "$base" >/dev/null 2>&1; then
        release=${base##*-}  # python:3.11.11-slim-bookworm -> bookworm
        local_base=localhost/debian-py:$release
        if ! podman image exists "$local_base"; then
            [ "$(id -u)" = 0 ] || die "cannot pull $base; making a local base needs root (debootstrap)"
            command -v debootstrap >/dev/null || die "cannot pull $base; apt-get install debootstrap to make a local one"
            # shellcheck disable=SC2016  # $(RELEASE) is apt's own field syntax
            mirror=$(apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 2>/dev/null | awk -v r="$release" '$1 == r {print $2; exit}')
            [ -n "$mirror" ] || die "cannot pull $base, and apt knows no mirror of Debian $release to make a local one"
            say "cannot pull $base: making $local_base with debootstrap from $mirror"
            start=$(date +%s)
            debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$release" "$tmp/rootfs" "$mirror" \
                >"$tmp/debootstrap.log" 2>&1 || { tail -n 20 "$tmp/debootstrap.log" >&2; die "debootstrap failed"; }
            rm -rf "$tmp"/rootfs/var/cache/apt/archives/*.deb "$tmp"/rootfs/var/cache/apt/*.bin "$tmp"/rootfs/var/lib/apt/lists/*
            tar -C "$tmp/rootfs" -c . | podman import -q - "$local_base" >/dev/null
            rm -rf "$tmp/rootfs"
            say "made $local_base in $(( $(date +%s) - start ))s"
        fi
        base=$local_base
    fi
    if [ -z "${CONTAINERS_CONF:-}" ] && ! podman run --rm "$base" true >/dev/null 2>&1; then
        printf '[containers]\ndefault_ulimits = []\n' >"$tmp/containers.conf"
        export CONTAINERS_CONF="$tmp/containers.conf"
        podman run --rm "$base" true || die "podman cannot start a container from $base"
        say "podman cannot raise a container's ulimits here: containers get podman's own"
    fi
    mkdir -p "$tmp/home/.config/pip"
    printf '[global]\n' >"$tmp/home/.config/pip/pip.conf"
    for links in $(pip_setting find-links); do
        for wheel in "${links#file://}"/torch-"$torch_version"+cpu-*.whl; do
            [ -f "$wheel" ] || continue
            mkdir -p "$tmp/home/wheels"
            ln "$wheel" "$tmp/home/wheels/" 2>/dev/null || cp "$wheel" "$tmp/home/wheels/"
            printf 'find-links = /root/wheels\n' >>"$tmp/home/.config/pip/pip.conf"
            set -- "$@" --build-arg TORCH_INDEX_URL=
            say "torch from $wheel"
            break 2
        done
    done
    cert=$(pip_setting cert)
    if [ -n "$cert" ] && [ -f "$cert" ]; then
        cp "$cert" "$tmp/home/ca.pem"
        printf 'cert = /root/ca.pem\n' >>"$tmp/home/.config/pip/pip.conf"
    fi
    set -- "$@" --build-arg PYTHON_IMAGE="$base" --volume "$tmp/home:/root:ro"
fi

say "building $image with $engine from $base"
start=$(date +%s)
"$engine" build "$@" --tag "$image" "$root" >"$logs/build.log" 2>&1 || { tail -n 40 "$logs/build.log" >&2; die "the build failed"; }
build_s=$(( $(date +%s) - start ))
size=$("$engine" image inspect --format '{{.Size}}' "$image")
say "built $image in ${build_s}s: $(( size / 1000000 )) MB"

# The run: the sample in a folder owned by a non-root user, the image run as that user.
if [ "$(id -u)" = 0 ]; then user=${IMAGE_TEST_USER:-1000:1000}; else user=$(id -u):$(id -g); fi
uid=${user%:*}
[ "$uid" != 0 ] || die "IMAGE_TEST_USER must not be root"
work=$tmp/work
mkdir -p "$work/out"
cp -R "$root/samples" "$work/samples"
[ "$(id -u)" != 0 ] || chown -R "$user" "$work"
# Rootless podman maps container uids to subordinate ones; keep-id maps the user to itself.
userns=
if [ "$engine" = podman ] && [ "$(podman info --format '{{.Host.Security.Rootless}}')" = true ]; then userns=--userns=keep-id; fi
ddtool() { "$engine" run --rm --network none --user "$user" ${userns:+"$userns"} --volume "$work:/work:Z" "$image" "$@"; }
sample="samples/fmnist_quick.pt --arch samples/quick.py:quick"
start=$(date +%s)
# shellcheck disable=SC2086  # $sample is two options
{
    ddtool inspect $sample --input-shape 1,28,28 &&
    ddtool distill $sample --data samples/unlabelled --out out/distilled --classes samples/classes.txt --epochs 1 --export onnx &&
    ddtool predict out/distilled/model.onnx --data samples/eval --out out/predictions.csv
} >"$logs/run.log" 2>&1 || { cat "$logs/run.log" >&2; die "the image failed on the sample"; }
run_s=$(( $(date +%s) - start ))
grep -E '^(wrote|distilled)' "$logs/run.log" | sed 's/^/  /'

say "build ${build_s}s, run ${run_s}s (image $image, $(( size / 1000000 )) MB, $engine)"

# The checks, on the host. The predictions: one row per eval image, mostly right.
images=$(find "$work/samples/eval" -name '*.png' | wc -l)
# Column 1 is samples/eval/<k>_<class>/<file>, column 2 the top-1 class.
read -r rows right <<EOF
$(awk -F, 'NR > 1 { n++; split($1, p, "/"); sub(/^[0-9]+_/, "", p[3]); if (p[3] == $2) k++ } END { print n + 0, k + 0 }' "$work/out/predictions.csv")
EOF
[ "$rows" = "$images" ] || die "predictions.csv has $rows rows for $images images"
# The sample's teacher is right on 88.7% of eval/; one epoch of distillation starts from it.
[ $(( 100 * right )) -ge $(( 80 * images )) ] || die "the distilled model is right on only $right of $images eval images"

# The files: every one the container wrote belongs to the user it ran as and is readable by group
# and others (what umask 022 leaves of 0666), not private (0600).
onnx=$work/out/distilled/model.onnx
[ -s "$onnx" ] || die "no ONNX file: $onnx"
bad=$(find "$work/out" -type f \( ! -uid "$uid" -o ! -perm -044 \) -exec stat -c '  %n: uid %u, mode %a' {} +)
[ -z "$bad" ] || die "files not owned by uid $uid or not readable by others (umask 022):
$(echo "$bad" | sed "s|$work/||")"
say "ok: every file the container wrote belongs to uid $uid and is readable by others (model.onnx: mode $(stat -c %a "$onnx")); $right of $images eval images right"
