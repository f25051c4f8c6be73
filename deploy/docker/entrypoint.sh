#!/bin/sh
# Entry point of the fdpass image: `docker run IMAGE collect ...` runs `fdpass collect ...`.
#
# For the commands that load the probes (collect, run, doctor) it first makes
# sure bcc has a kernel headers tree and tracefs is reachable:
#
# - bcc compiles the BPF C at start-up with its embedded clang and refuses to
#   do so without *a* headers tree. fdpass reads every kernel struct layout
#   from the running kernel's BTF (/sys/kernel/btf/vmlinux), never from the
#   headers, so any reasonably recent tree works. The host's own tree, when
#   /lib/modules and /usr/src are mounted and it has one, is used as is.
#   Otherwise the generic Debian tree baked into the image is used, through
#   bcc's BCC_KERNEL_SOURCE (the host's /lib/modules stays read-only).
# - tracefs: the syscall tracepoints are found under /sys/kernel/tracing (or
#   /sys/kernel/debug/tracing). If the host has not mounted it, a privileged
#   container mounts it in its own mount namespace (the host is not touched).
set -eu

say() { printf 'fdpass-entrypoint: %s\n' "$*" >&2; }

case "${1:-}" in
collect | run | doctor)
  krel=$(uname -r)
  if [ -n "${BCC_KERNEL_SOURCE:-}" ]; then
    say "kernel headers: BCC_KERNEL_SOURCE=$BCC_KERNEL_SOURCE (set by the operator)"
  elif [ -f "/lib/modules/$krel/build/include/linux/kconfig.h" ] || [ -f "/lib/modules/$krel/source/include/linux/kconfig.h" ]; then
    say "kernel headers: the host's tree at /lib/modules/$krel"
  elif [ -f /opt/fdpass/kernel-headers/include/linux/kconfig.h ]; then
    export BCC_KERNEL_SOURCE=/opt/fdpass/kernel-headers
    say "kernel headers: none for $krel on the host; using the image's generic tree $BCC_KERNEL_SOURCE" \
        "(only for bcc's compiler: struct layouts come from the kernel's BTF)"
  else
    say "kernel headers: none found for $krel; bcc will try /sys/kernel/kheaders.tar.xz"
  fi
  if [ ! -d /sys/kernel/tracing/events/syscalls ] && [ ! -d /sys/kernel/debug/tracing/events/syscalls ]; then
    if mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null; then
      say "tracefs was not mounted: mounted it at /sys/kernel/tracing (in this container only)"
    else
      say "tracefs is not reachable: mount it on the host (mount -t tracefs none /sys/kernel/tracing)" \
          "and bind it into the container, or run the container privileged"
    fi
  fi
  ;;
esac

exec fdpass "$@"
