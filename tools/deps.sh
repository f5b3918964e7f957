#!/usr/bin/env bash
# Installs what VolumeDriver needs on Debian 12: the native libraries it links (RocksDB, libs3, snappy, libaio) and,
# with --test, the NBD clients the tests drive (qemu-utils, libnbd-bin, fio) and the S3 test server (Ceph RGW).
# Idempotent: packages already installed are skipped. Needs root (or sudo).
set -euo pipefail

build_packages=(pkg-config librocksdb-dev libs3-dev libsnappy-dev libaio-dev)
test_packages=(qemu-utils libnbd-bin fuse3 fuse2fs e2fsprogs fio python3 python3-libnbd procps curl openssl time iproute2)
s3_packages=(radosgw ceph-mon ceph-osd)

want=("${build_packages[@]}")
for arg in "$@"; do
  case "$arg" in
    --test) want+=("${test_packages[@]}" "${s3_packages[@]}") ;;
    --bench) want+=("${test_packages[@]}" nbdkit) ;;
    *) echo "usage: $0 [--test] [--bench]" >&2; exit 2 ;;
  esac
done

missing=()
for package in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing: ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v swift >/dev/null; then
  for candidate in /opt/swift/usr/bin /usr/share/swift/usr/bin; do
    [ -x "$candidate/swift" ] && { echo "note: add $candidate to PATH" >&2; break; }
  done
  echo "error: the Swift 6 toolchain is not on PATH (https://www.swift.org/install/linux/ , Debian 12 tarball)" >&2
  exit 1
fi
