#!/usr/bin/env bash
# Checks irqvm's Linux loader against a real kernel, outside ./test.sh because it needs one
# installed (Debian: apt-get install linux-image-cloud-amd64 lz4). It extracts the vmlinux from
# the bzImage (extract-vmlinux.sh), reads the vmlinux's PVH entry note with binutils' readelf as
# an independent reference, and runs examples/linux_image.rs, which loads the bzImage (64-bit boot
# protocol) and the vmlinux (PVH) with the initrd into guest memory and checks the entry points,
# the zero page and hvm_start_info. It boots nothing.
#
# Usage: check-linux-image.sh [BZIMAGE [INITRD]]
#   defaults: the newest /boot/vmlinuz-* and its /boot/initrd.img-*
set -euo pipefail
cd "$(dirname "$0")/../../.."

die() { echo "check-linux-image: $*" >&2; exit 1; }
bz=${1:-$(find /boot -maxdepth 1 -name 'vmlinuz-*' 2>/dev/null | sort -V | tail -n 1)}
[ -n "$bz" ] && [ -r "$bz" ] || die "no kernel found: apt-get install linux-image-cloud-amd64"
initrd=${2:-/boot/initrd.img-${bz#/boot/vmlinuz-}}
[ -r "$initrd" ] || die "no initrd $initrd"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
crates/irqvm/scripts/extract-vmlinux.sh "$bz" "$tmp/vmlinux"

# The Xen note of type 18 (XEN_ELFNOTE_PHYS32_ENTRY = 0x12): readelf prints its descriptor as
# little-endian bytes, which are reversed into the address.
bytes=$(readelf -nW "$tmp/vmlinux" | awk -F'description data: ' \
  '/^ *Xen / && (/\(0x00000012\)/ || /PHYS32_ENTRY/) { print $2; exit }')
[ -n "$bytes" ] || die "$tmp/vmlinux has no PVH entry note (CONFIG_PVH off?)"
entry=0x$(echo "$bytes" | tr ' ' '\n' | grep . | tac | tr -d '\n')
echo "check-linux-image: readelf: PVH entry $entry"

EXPECT_PVH_ENTRY=$entry cargo run -q -p irqvm --example linux_image -- "$bz" "$tmp/vmlinux" "$initrd"
