#!/usr/bin/env bash
# Extracts the uncompressed kernel (vmlinux, an ELF executable that carries the PVH entry note)
# from a Linux x86 bzImage such as Debian's /boot/vmlinuz-*.
#
# Usage: extract-vmlinux.sh BZIMAGE OUTPUT
#
# The setup header (Linux Documentation/arch/x86/boot.rst) says where the compressed kernel is:
# payload_offset (0x248, protocol 2.08+) counts from the start of the protected-mode code, which
# follows the (setup_sects + 1) * 512 bytes of setup (setup_sects at 0x1F1; 0 means 4), and
# payload_length (0x24C) is its size. The compressor is recognised by its magic bytes and the
# matching Debian tool decompresses it (gzip, xz, lz4, zstd, bzip2, lzma, lzop). The kernel's
# build appends the uncompressed size as 4 little-endian bytes to every format but gzip
# (scripts/Makefile.lib, size_append); it is stripped before decompressing and then checked
# against the output.
set -euo pipefail

die() { echo "extract-vmlinux: $*" >&2; exit 1; }
[ $# = 2 ] || die "usage: extract-vmlinux.sh BZIMAGE OUTPUT"
in=$1
out=$2
[ -r "$in" ] || die "cannot read $in"

# u OFFSET SIZE: the little-endian unsigned integer of SIZE bytes at OFFSET of the input.
u() { od -An -t "u$2" -j "$1" -N "$2" "$in" | tr -d ' \n'; }
# hex OFFSET COUNT: COUNT bytes at OFFSET as hex digits.
hex() { od -An -t x1 -j "$1" -N "$2" "$in" | tr -d ' \n'; }

[ "$(hex $((0x202)) 4)" = 48647253 ] || die "$in is not a bzImage (no \"HdrS\" at 0x202)"
version=$(u $((0x206)) 2)
[ "$version" -ge $((0x208)) ] || die "boot protocol $(printf %#x "$version") has no payload fields (2.08+)"
setup_sects=$(u $((0x1F1)) 1)
[ "$setup_sects" = 0 ] && setup_sects=4
payload_offset=$(u $((0x248)) 4)
payload_length=$(u $((0x24C)) 4)
start=$(( (setup_sects + 1) * 512 + payload_offset ))
size=$(stat -c %s "$in")
[ $((start + payload_length)) -le "$size" ] || die "the payload ($start+$payload_length) runs past the end of the file ($size)"

magic=$(hex "$start" 6)
trailer=4
case $magic in
  1f8b*) tool=(gzip -dc); trailer=0 ;;
  fd377a585a00) tool=(xz -dc) ;;
  02214c18*) tool=(lz4 -dc) ;;
  28b52ffd*) tool=(zstd -dc) ;;
  425a68*) tool=(bzip2 -dc) ;;
  5d0000*) tool=(xz --format=lzma -dc) ;;
  894c5a4f*) tool=(lzop -dc) ;;
  *) die "unknown compression (payload starts with $magic)" ;;
esac
command -v "${tool[0]}" >/dev/null || die "${tool[0]} is not installed (Debian: apt-get install ${tool[0]})"

tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
dd if="$in" bs=1M iflag=skip_bytes,count_bytes skip="$start" count=$((payload_length - trailer)) \
  status=none | "${tool[@]}" >"$tmp" || die "${tool[*]} failed on the payload"
if [ "$trailer" = 4 ]; then
  expected=$(u $((start + payload_length - 4)) 4)
  actual=$(stat -c %s "$tmp")
  [ "$expected" = "$actual" ] || die "decompressed $actual bytes, the image says $expected"
fi
[ "$(od -An -t x1 -N 4 "$tmp" | tr -d ' \n')" = 7f454c46 ] || die "the payload is not an ELF file"
mv "$tmp" "$out"
trap - EXIT
echo "extract-vmlinux: ${tool[0]} payload of $payload_length bytes -> $out ($(stat -c %s "$out") bytes)"
