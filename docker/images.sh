#!/usr/bin/env bash
# Builds x2v's container images on this host, from Debian's package mirrors and the binaries built
# here; no container registry is involved:
#
#   x2v-base:bookworm    Debian 12 minbase, bootstrapped by mmdebstrap and imported (docker/debian/)
#   x2v-redis:bookworm   Debian's redis-server on x2v-base
#   x2v-gateway:latest   x2v-gateway (the API; no libtorch) on x2v-base
#   x2v:cpu              x2v (every service, `demo-model`, `doctor`) and the libtorch libraries it
#                        loads, on x2v-base
#   x2v:cuda             with --cuda: x2v and all of torch's CUDA libraries (docker/README.md)
#
#   docker/images.sh [--bin-dir DIR] [--cuda]
#
# --bin-dir DIR takes x2v and x2v-gateway from DIR (e.g. what the tests built) instead of building
# them with `cargo build --release`. The libtorch libraries come from the venv's torch wheel, the
# one the binary was linked against (VENV, default ~/.cache/x2v/venv). X2V_IMAGE,
# X2V_GATEWAY_IMAGE and X2V_REDIS_IMAGE name the images (the compose files read the same
# variables).
#
# Warm, it only re-copies what changed: the base is bootstrapped again only when its package list
# or recipe changes (its tag carries their hash), the Redis layer likewise, and docker's layer cache
# keeps the libtorch layer while only the binary changes. Needs docker and, for the base,
# mmdebstrap (installed with apt if missing) with access to a Debian mirror.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
cache="${X2V_CACHE:-$HOME/.cache/x2v}"
work="$cache/images"
venv="${VENV:-$cache/venv}"
suite=bookworm
mirror="${X2V_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security_mirror="${X2V_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
x2v_image="${X2V_IMAGE:-x2v:cpu}"
gateway_image="${X2V_GATEWAY_IMAGE:-x2v-gateway:latest}"
redis_image="${X2V_REDIS_IMAGE:-x2v-redis:$suite}"
bin_dir=""
cuda=0
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) bin_dir="$2"; shift 2 ;;
        --cuda) cuda=1; shift ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "images: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

# The legacy builder: it needs no buildx plugin, and the Dockerfiles use nothing BuildKit adds.
export DOCKER_BUILDKIT=0
started=$SECONDS
mkdir -p "$work"
say() { printf 'images: %s\n' "$*"; }
sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
packages() { { grep -vE '^\s*(#|$)' "$1" || true; } | tr '\n' ' ' | sed 's/ $//'; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }
# build_image TAG CONTEXT: the context's Dockerfile on the base; quiet unless it fails. The image
# TAG named before is removed once no tag names it any more, so rebuilds (a new binary every test
# run) leave no untagged images behind; `docker image rm` refuses one a container still runs.
build_image() {
    local out old
    old="$(docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true)"
    if ! out="$(nice -n 19 docker build -q --build-arg "BASE=$base" -t "$1" "$2" 2>&1)"; then
        printf '%s\n' "$out" >&2
        echo "images: building $1 failed" >&2
        exit 1
    fi
    if [ -n "$old" ] && [ "$(docker image inspect -f '{{len .RepoTags}}' "$old" 2>/dev/null)" = 0 ]; then
        docker image rm "$old" >/dev/null 2>&1 || true
    fi
}

# mmdebstrap options of every root file system: minbase, /usr merged without the usrmerge package
# (which would pull in perl), no manuals, info pages, translations or docs but the copyright files,
# as Debian's own slim images. The recipe is part of the base's tag.
mmdebstrap_opts=(
    --variant=minbase
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-include=/usr/share/locale/locale.alias'
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/lintian/*'
)

# bootstrap OUT.tar PACKAGES: a root file system tarball from Debian's mirrors (bookworm, its
# updates and security fixes). SOURCE_DATE_EPOCH makes it byte-for-byte reproducible for the same package
# versions.
bootstrap() {
    local out="$1" include="$2"
    command -v mmdebstrap >/dev/null || {
        say "installing mmdebstrap (apt)"
        sudo_if_needed apt-get update -qq
        DEBIAN_FRONTEND=noninteractive sudo_if_needed apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
    }
    local epoch
    epoch="$(git -C "$root" log -1 --format=%ct -- docker/debian 2>/dev/null || true)"
    rm -rf "$out.partial"
    if ! SOURCE_DATE_EPOCH="${epoch:-1700000000}" nice -n 19 mmdebstrap --format=tar "${mmdebstrap_opts[@]}" \
            ${include:+--include="${include// /,}"} "$suite" "$out.partial" \
            "deb $mirror $suite main" "deb $mirror $suite-updates main" \
            "deb $security_mirror $suite-security main" > "$out.log" 2>&1; then
        tail -n 30 "$out.log" >&2
        echo "images: mmdebstrap failed (log: $out.log)" >&2
        exit 1
    fi
    mv "$out.partial" "$out"
}

# --- x2v-base ---------------------------------------------------------------------------------
base_packages="$(packages "$here/debian/base.packages")"
base_hash="$(printf '%s\n' "$suite" "${mmdebstrap_opts[@]}" "$base_packages" | sha256sum | cut -c1-12)"
base="x2v-base:$suite-$base_hash"
base_tar="$work/base-$base_hash.tar"
if have_image "$base"; then
    say "$base exists"
else
    t=$SECONDS
    say "bootstrapping $base (Debian $suite minbase${base_packages:+ + $base_packages}) from $mirror"
    [ -f "$base_tar" ] || bootstrap "$base_tar" "$base_packages"
    docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' --message "Debian $suite minbase (docker/debian/base.packages)" \
        "$base_tar" "$base" >/dev/null
    say "imported $base in $((SECONDS - t)) s"
fi
docker tag "$base" "x2v-base:$suite"

# --- x2v-redis --------------------------------------------------------------------------------
redis_packages="$(packages "$here/debian/redis.packages")"
redis_hash="$(printf '%s\n' "$base_hash" "$redis_packages" | sha256sum | cut -c1-12)"
redis_versioned="x2v-redis:$suite-$redis_hash"
if have_image "$redis_versioned"; then
    say "$redis_versioned exists"
else
    t=$SECONDS
    ctx="$work/context/redis"
    rm -rf "$ctx" && mkdir -p "$ctx"
    if [ ! -f "$base_tar" ]; then
        # The base was imported earlier and its tarball removed since: the image has the same files.
        id="$(docker create "$base")"
        docker export "$id" > "$base_tar.partial" && docker rm "$id" >/dev/null
        mv "$base_tar.partial" "$base_tar"
    fi
    say "bootstrapping the Redis layer ($redis_packages)"
    bootstrap "$work/redis-$redis_hash.tar" "$base_packages $redis_packages"
    python3 "$here/rootfs-delta.py" "$base_tar" "$work/redis-$redis_hash.tar" "$ctx/layer.tar"
    rm -f "$work/redis-$redis_hash.tar"
    cp "$here/Dockerfile.redis" "$ctx/Dockerfile"
    build_image "$redis_versioned" "$ctx"
    say "built $redis_versioned in $((SECONDS - t)) s"
fi
docker tag "$redis_versioned" "$redis_image"

# --- the binaries ---------------------------------------------------------------------------------
if [ -z "$bin_dir" ]; then
    export LIBTORCH_USE_PYTORCH=1 PATH="$venv/bin:$PATH"
    t=$SECONDS
    (cd "$root" && nice -n 19 cargo build -q --release -p x2v -p x2v-gateway --bins)
    bin_dir="${CARGO_TARGET_DIR:-$cache/target}/release"
    say "cargo build --release: $((SECONDS - t)) s"
fi
for b in x2v x2v-gateway; do
    [ -x "$bin_dir/$b" ] || { echo "images: $bin_dir/$b is missing" >&2; exit 1; }
done
site="$(echo "$venv"/lib/python3*/site-packages)"
[ -d "$site/torch/lib" ] || { echo "images: no torch wheel in $venv (make setup)" >&2; exit 1; }

# stage_common CTX BIN: the binary (debug info stripped: symbols stay, for backtraces), the
# healthcheck and the default configs.
stage_common() {
    local ctx="$1" bin="$2"
    mkdir -p "$ctx"
    objcopy --strip-debug "$bin_dir/$bin" "$ctx/$bin"
    cp "$here/x2v-healthcheck" "$ctx/"
    cp -r "$root/configs" "$ctx/configs"
}

# copy_lib FILE: a library of the venv into the context's opt/, at its path under site-packages, so
# that the run paths of torch's libraries ($ORIGIN/../../nvidia/cu13/lib) resolve in the image too.
copy_lib() {
    local path rel
    path="$(realpath -m --no-symlinks "$1")"   # ldd prints torch/lib/../../nvidia/...
    rel="${path#"$site"/}"
    mkdir -p "$ctx/opt/$(dirname "$rel")"
    # Hard links when the cache shares the venv's file system: no copy of 450 MB per build.
    ln -fL "$path" "$ctx/opt/$rel" 2>/dev/null || cp -fL "$path" "$ctx/opt/$rel"
}

# venv_libs FILE...: the venv's libraries the dynamic loader maps for FILEs (what ldd resolves
# under site-packages), NEEDED entries followed recursively.
venv_libs() {
    LD_LIBRARY_PATH="$site/torch/lib" ldd "$@" | awk -v site="$site/" 'index($3, site) == 1 { print $3 }' | sort -u
}

# --- x2v-gateway ----------------------------------------------------------------------------------
t=$SECONDS
ctx="$work/context/gateway"
rm -rf "$ctx"
stage_common "$ctx" x2v-gateway
if [ -n "$(venv_libs "$ctx/x2v-gateway")" ]; then
    echo "images: x2v-gateway loads libraries of the venv; it must not link libtorch" >&2
    exit 1
fi
cp "$here/Dockerfile.gateway" "$ctx/Dockerfile"
build_image "$gateway_image" "$ctx"
say "built $gateway_image in $((SECONDS - t)) s"

# --- x2v (CPU) and x2v:cuda -----------------------------------------------------------------------
# x2v_image_build TAG LIB...: x2v with LIBs of the venv, torch/version.py (which `x2v doctor` reads
# for the runtime version) and everything else x2v needs.
x2v_image_build() {
    local tag="$1"; shift
    t=$SECONDS
    ctx="$work/context/$(echo "$tag" | tr ':/' '--')"
    rm -rf "$ctx"
    stage_common "$ctx" x2v
    local lib
    for lib in "$@"; do copy_lib "$lib"; done
    cp "$site/torch/version.py" "$ctx/opt/torch/version.py"
    cp "$here/Dockerfile" "$ctx/Dockerfile"
    build_image "$tag" "$ctx"
    say "built $tag in $((SECONDS - t)) s ($(du -sh --apparent-size "$ctx/opt" | cut -f1) of libraries)"
}

mapfile -t cpu_libs < <(venv_libs "$bin_dir/x2v")
[ "${#cpu_libs[@]}" -gt 0 ] || { echo "images: ldd finds no libtorch for $bin_dir/x2v" >&2; exit 1; }
x2v_image_build "$x2v_image" "${cpu_libs[@]}"

if [ "$cuda" = 1 ]; then
    # x2v loads libtorch_cuda.so itself when it computes on a GPU, and CUDA loads further libraries
    # (cuDNN's engines, NVRTC, ...) by name at run time: every library of torch and of the nvidia
    # wheels goes in, not just the linked ones.
    [ -f "$site/torch/lib/libtorch_cuda.so" ] || {
        echo "images: --cuda needs a CUDA build of torch in $venv (torch/lib/libtorch_cuda.so)" >&2; exit 1; }
    mapfile -t cuda_libs < <(find "$site/torch/lib" "$site"/nvidia/*/lib -maxdepth 1 -name '*.so*' \
                                  ! -name 'libtorch_python.so' | sort)
    x2v_image_build "${X2V_CUDA_IMAGE:-x2v:cuda}" "${cuda_libs[@]}"
fi

# The transfer secret the compose files hand every stage, written once. Its directory is private
# to this user, so the file itself may be readable by all: the containers' user (uid 10001) reads it
# through its bind mount.
secret="$here/secrets/x2v_transfer_secret"
if [ ! -f "$secret" ]; then
    install -d -m 0700 "$here/secrets"
    (umask 022 && head -c 32 /dev/urandom | base64 | tr -d '\n' > "$secret")
    say "wrote a new transfer secret to docker/secrets/x2v_transfer_secret"
fi

say "done in $((SECONDS - started)) s:"
images=("x2v-base:$suite" "$redis_image" "$gateway_image" "$x2v_image")
[ "$cuda" = 1 ] && images+=("${X2V_CUDA_IMAGE:-x2v:cuda}")
for image in "${images[@]}"; do
    docker image inspect -f '{{.Size}}' "$image" | awk -v i="$image" '{ printf "  %-24s %7.0f MB\n", i, $1 / 1e6 }'
done
