#!/usr/bin/env bash
# Builds (once) a Debian bookworm root with systemd for the packaging tests and prints the path
# of the cached tarball. The Debian mirror is read from this machine's apt sources.
#
#   tests/nspawn/make-root.sh CACHE_DIR
set -euo pipefail
cache=${1:?usage: make-root.sh CACHE_DIR}
tarball="$cache/bookworm-systemd-root-v5.tar"
if [ -f "$tarball" ]; then echo "$tarball"; exit 0; fi
mkdir -p "$cache"
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
if [ -z "$mirror" ]; then
  mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
[ -n "$mirror" ] || { echo "make-root.sh: no Debian mirror in the apt sources" >&2; exit 1; }
root=$(mktemp -d "$cache/root.XXXXXX")
trap 'umount "$root/proc" 2>/dev/null || true; rm -rf "$root"' EXIT
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
  || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
mount -t proc proc "$root/proc"
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  systemd systemd-sysv dbus git ca-certificates >"$cache/apt.log" 2>&1 || { tail -20 "$cache/apt.log" >&2; exit 1; }
chroot "$root" apt-get clean
umount "$root/proc"
# A machine id and no getty on the container console keep boots quick and quiet. D-Bus and
# logind are masked: systemctl (as root) talks to systemd over its private socket, and in
# this sandbox dbus-daemon cannot set up inotify and stalls the boot for 90 s.
: > "$root/etc/machine-id"
chroot "$root" systemctl mask console-getty.service getty@tty1.service \
  systemd-networkd-wait-online.service dbus.service dbus.socket systemd-logind.service >/dev/null 2>&1 || true
# mktemp made the directory 0700: the root of a system must be 0755, or no user but root can
# even change into "/".
chmod 755 "$root"
tar -C "$root" -cf "$tarball.tmp" .
mv "$tarball.tmp" "$tarball"
echo "$tarball"
