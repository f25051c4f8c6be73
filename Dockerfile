# The fdpass image: collector (`collect`), sink (`sink`), `query`, `doctor`.
#
#   scripts/build-image                 fdpass:local and fdpass:local-embedded (and the local
#                                       Kafka image), on a machine without registry access too;
#                                       see deploy/README.md ("Building the images")
#   docker buildx build -t fdpass .     collector, sink to a ClickHouse server
#   docker buildx build --build-arg FDPASS_EXTRAS=embedded -t fdpass .   also the embedded store (chDB)
#   docker run --rm --privileged --pid host ... fdpass collect --kafka kafka:9092   (see docker-compose.yml)
#
# Needs BuildKit (the default builder since Docker 23; DOCKER_BUILDKIT=1 with
# a 20.10 CLI): the pip steps take an optional CA bundle as the build secret
# `ca_bundle` (--secret id=ca_bundle,src=FILE, for networks whose TLS gateway
# re-signs PyPI's certificate), mounted for those steps only and never in a
# layer, and keep pip's cache in a cache mount between builds.
#
# What is in it and why:
# - Debian bookworm, its python3 (3.11) and python3-bpfcc (bcc 0.26). bcc's
#   Python bindings are not on PyPI; Debian's are linked into the virtualenv
#   alone (a .pth pointing at a folder holding only the bcc package, as
#   scripts/setup does), so no other system package leaks into the venv.
# - No compiler. bcc compiles the BPF C at start-up with the clang/LLVM
#   libraries libbpfcc links (libclang-cpp14, libllvm14), not with a clang
#   binary. What it needs besides is a kernel headers tree (see below).
# - fdpass's own C accelerators (setup.py: the Avro writer of the collector,
#   the Avro -> Native converter of the sink) are compiled in a throw-away
#   stage into the fdpass wheel; the final image checks they import, so an
#   image never silently runs the slower pure-Python paths.
# - chDB (the embedded store, pip extra `embedded`) only with
#   --build-arg FDPASS_EXTRAS=embedded: the collector publishes to Kafka and
#   the fleet's sink writes to a ClickHouse server; neither needs it.
# - fdpass and its dependencies from PyPI, wheels only (--only-binary): if a
#   dependency had no wheel for the platform the build fails here instead of
#   silently wanting gcc.
#
# Kernel headers, and why both a host mount and a baked-in fallback:
# bcc refuses to compile without a headers tree, but fdpass never takes a
# struct layout from headers: every offset comes from the running kernel's BTF
# (collector/btf.py). So the tree only has to satisfy the compiler, and any
# version does. The host's /lib/modules + /usr/src are mounted (read-only) in
# docker-compose.yml and the DaemonSet and are used when the host has a tree
# for its kernel (a matching tree is never worse). Many hosts have none (cloud
# images, Firecracker VMs like ours), so the image also carries Debian's
# generic linux-headers (6.1, ~80 MB merged) at /opt/fdpass/kernel-headers,
# used through BCC_KERNEL_SOURCE when the host has nothing. That keeps the
# host requirement to what the README says: BTF and the syscall tracepoints.
# The headers are installed in a throw-away stage, because Debian's
# linux-headers package depends on gcc; only the merged tree is copied over.

ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS headers
ARG DEBIAN_FRONTEND=noninteractive
# Debian splits a headers tree into linux-headers-VER-ARCH (generated files,
# .config) and linux-headers-VER-common (the sources). bcc's BCC_KERNEL_SOURCE
# wants one tree, so they are merged (arch files on top). The scripts/ and
# tools/ symlinks point into linux-kbuild, which is not copied: bcc needs
# neither.
RUN set -eux; \
    arch="$(dpkg --print-architecture)"; \
    apt-get update; \
    apt-get install -y --no-install-recommends "linux-headers-${arch}"; \
    arch_dir="$(ls -d /usr/src/linux-headers-*-"${arch}" | sort -V | tail -n 1)"; \
    common_dir="${arch_dir%-*}-common"; \
    mkdir /kernel-headers; \
    cp -a "${common_dir}/." /kernel-headers/; \
    cp -a "${arch_dir}/." /kernel-headers/; \
    rm -f /kernel-headers/scripts /kernel-headers/tools; \
    test -f /kernel-headers/include/linux/kconfig.h; \
    test -d /kernel-headers/include/generated

# The fdpass wheel, C accelerators compiled, with the same Debian python3
# (same ABI) as the final image.
FROM ${DEBIAN_IMAGE} AS wheel
ARG DEBIAN_FRONTEND=noninteractive
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates
# Only what the package is built from (see .dockerignore), so that editing
# tests or docs does not invalidate this layer's cache.
COPY pyproject.toml setup.py README.md /src/
COPY fdpass /src/fdpass
COPY bpf /src/bpf
COPY collector /src/collector
COPY schemas /src/schemas
COPY sinks /src/sinks
RUN --mount=type=secret,id=ca_bundle \
    set -eux; \
    [ ! -s /run/secrets/ca_bundle ] || export PIP_CERT=/run/secrets/ca_bundle; \
    python3 -m venv /opt/build-venv; \
    /opt/build-venv/bin/pip install --no-cache-dir --upgrade pip; \
    /opt/build-venv/bin/pip wheel --no-cache-dir --no-deps -w /wheels /src; \
    ls /wheels/fdpass-*-cp3*-linux_*.whl

FROM ${DEBIAN_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends python3 python3-venv python3-bpfcc ca-certificates; \
    rm -rf /var/lib/apt/lists/*

# The virtualenv, seeing Debian's bcc and nothing else of the system's packages.
RUN set -eux; \
    python3 -m venv /opt/fdpass/venv; \
    mkdir -p /opt/fdpass/bcc-only; \
    ln -s /usr/lib/python3/dist-packages/bcc /opt/fdpass/bcc-only/bcc; \
    site="$(/opt/fdpass/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
    echo /opt/fdpass/bcc-only > "${site}/fdpass-bcc.pth"; \
    /opt/fdpass/venv/bin/python -c 'import bcc'

# Before the Python layers, which change more often.
COPY --from=headers /kernel-headers /opt/fdpass/kernel-headers
COPY deploy/docker/entrypoint.sh /usr/local/bin/fdpass-entrypoint

# The dependencies, in layers of their own keyed on pyproject.toml alone, so
# that a change to fdpass's code reinstalls only the fdpass wheel: first the
# ones every image has, then the extras (FDPASS_EXTRAS, declared only here so
# the layers above are shared by the collector and the full image). pip's
# cache is a BuildKit cache mount: kept between builds, never in the image.
# The CA bundle (scripts/build-image passes the host's) is a build secret,
# mounted for the one RUN on a tmpfs and never written to a layer.
RUN --mount=type=secret,id=ca_bundle \
    --mount=type=bind,source=pyproject.toml,target=/tmp/pyproject.toml \
    --mount=type=cache,target=/root/.cache/pip \
    set -eux; \
    [ ! -s /run/secrets/ca_bundle ] || export PIP_CERT=/run/secrets/ca_bundle; \
    /opt/fdpass/venv/bin/pip install --upgrade pip; \
    /opt/fdpass/venv/bin/python -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt; \
    /opt/fdpass/venv/bin/pip install --only-binary=:all: -r /tmp/requirements.txt; \
    rm /tmp/requirements.txt
ARG FDPASS_EXTRAS=
RUN --mount=type=secret,id=ca_bundle \
    --mount=type=bind,source=pyproject.toml,target=/tmp/pyproject.toml \
    --mount=type=cache,target=/root/.cache/pip \
    set -eux; \
    [ ! -s /run/secrets/ca_bundle ] || export PIP_CERT=/run/secrets/ca_bundle; \
    /opt/fdpass/venv/bin/python -c 'import sys, tomllib; extras = tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]["optional-dependencies"]; print("\n".join(r for x in sys.argv[1].split(",") if x for r in extras[x]))' "${FDPASS_EXTRAS}" > /tmp/requirements.txt; \
    if [ -s /tmp/requirements.txt ]; then /opt/fdpass/venv/bin/pip install --only-binary=:all: -r /tmp/requirements.txt; fi; \
    rm /tmp/requirements.txt

# fdpass itself, without resolving anything: every dependency is installed
# above, and `pip check` proves the wheel's metadata agrees.
COPY --from=wheel /wheels /tmp/wheels
RUN set -eux; \
    wheel="$(ls /tmp/wheels/fdpass-*.whl)"; \
    /opt/fdpass/venv/bin/pip install --no-cache-dir --no-deps --no-index "${wheel}"; \
    rm -rf /tmp/wheels; \
    /opt/fdpass/venv/bin/pip check; \
    /opt/fdpass/venv/bin/python -c 'import fdpass.collector._capture, fdpass.schemas._avro_writer, fdpass.sinks._avro_to_native'; \
    case ",${FDPASS_EXTRAS}," in *,embedded,*) /opt/fdpass/venv/bin/python -c 'import chdb' ;; esac; \
    /opt/fdpass/venv/bin/fdpass --help >/dev/null


ENV PATH=/opt/fdpass/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Root: loading BPF programs needs it (or CAP_BPF + CAP_PERFMON, see
# deploy/kubernetes/daemonset.yaml). The sink and query need no privilege;
# run them with --user if you like.
WORKDIR /var/lib/fdpass
ENTRYPOINT ["/usr/local/bin/fdpass-entrypoint"]
CMD ["--help"]
