# The torture test's model of a disk: for every 512-byte sector, the id of the write that last stored it (0 = zeroes).
# Sector content is generated from (write id, sector), so the model stays small (8 bytes a sector) while every byte
# read back can be checked, and a wrong sector can be named: which write it came from, or that it is garbage.
# Also: the comparison of data read over NBD against the model, and readable reports of the first differences.

import struct
from array import array

SECTOR = 512
_ZERO_SECTOR = bytes(SECTOR)


def sector_bytes(wid, sector):
    """The 512 bytes write `wid` stores in `sector`: (wid, sector) as a 16-byte tag repeated; wid 0 is zeroes."""
    if wid == 0:
        return _ZERO_SECTOR
    return struct.pack("<QQ", wid, sector) * (SECTOR // 16)


def payload(wid, first, count):
    """The data of write `wid` covering `count` sectors from `first`."""
    return b"".join(sector_bytes(wid, s) for s in range(first, first + count))


def decode_sector(data, sector):
    """What a sector read back holds: ("wid", n), ("zero", 0), ("moved", (wid, from_sector)) or ("garbage", hex)."""
    if data == _ZERO_SECTOR:
        return ("zero", 0)
    wid, origin = struct.unpack_from("<QQ", data, 0)
    if wid != 0 and data == sector_bytes(wid, origin):
        return ("wid", wid) if origin == sector else ("moved", (wid, origin))
    return ("garbage", data[:16].hex())


class Disk:
    """Write ids of every sector of one volume, clone or frozen snapshot."""

    def __init__(self, sectors, wids=None):
        self.sectors = sectors
        self.wids = array("Q", bytes(8 * sectors)) if wids is None else array("Q", wids)
        # After a crash: sector -> set of write ids it may hold (old or new, for writes in flight at the crash).
        self.ambiguous = {}

    def copy(self):
        if self.ambiguous:
            raise AssertionError("copying a disk model that has unresolved sectors")
        return Disk(self.sectors, self.wids)

    def set(self, first, count, wid):
        for s in range(first, first + count):
            self.wids[s] = wid

    def allow(self, first, count, wid):
        """Writes in flight at a crash: each sector may hold its current write or `wid`."""
        for s in range(first, first + count):
            self.ambiguous.setdefault(s, {self.wids[s]}).add(wid)

    def expected(self, first, count):
        return b"".join(sector_bytes(self.wids[s], s) for s in range(first, first + count))

    def compare(self, first, data, resolve=False):
        """Differences between `data` (read from sector `first`) and the model, as (sector, expected, found) with
        found from decode_sector. Ambiguous sectors accept any allowed write; with resolve=True they take the
        value read (when allowed)."""
        count = len(data) // SECTOR
        if not self.ambiguous and data == self.expected(first, count):
            return []
        differences = []
        for i in range(count):
            s = first + i
            chunk = data[i * SECTOR:(i + 1) * SECTOR]
            allowed = self.ambiguous.get(s)
            if allowed is None:
                if chunk != sector_bytes(self.wids[s], s):
                    differences.append((s, self.wids[s], decode_sector(chunk, s)))
                continue
            found = decode_sector(chunk, s)
            value = {"zero": 0, "wid": found[1]}.get(found[0])
            if value in allowed:
                if resolve:
                    self.wids[s] = value
            else:
                differences.append((s, allowed, found))
        if resolve:
            for s in range(first, first + count):
                self.ambiguous.pop(s, None)
        return differences


def describe_expected(expected, origin):
    if isinstance(expected, set):
        return " or ".join(describe_expected(w, origin) for w in sorted(expected))
    return "zeroes" if expected == 0 else f"wid {expected} ({origin(expected)})"


def describe_found(found, origin):
    kind, value = found
    if kind == "zero":
        return "zeroes"
    if kind == "wid":
        return f"wid {value} ({origin(value)})"
    if kind == "moved":
        return f"wid {value[0]} of sector {value[1]} ({origin(value[0])}) -- data from another sector"
    return f"garbage (first bytes {value})"


def report(differences, origin, limit=12):
    """Readable lines for the first differences, runs of neighbouring sectors with the same story merged.
    `origin(wid)` names the operation that issued a write."""
    lines = []
    runs = []
    for s, expected, found in differences:
        key = (repr(expected), found[0], found[1] if found[0] != "moved" else found[1][0])
        if runs and runs[-1][1] == s - 1 and runs[-1][2] == key:
            runs[-1][1] = s
        else:
            runs.append([s, s, key, expected, found])
    for first, last, _, expected, found in runs[:limit]:
        where = f"sector {first}" if first == last else f"sectors {first}-{last}"
        lines.append(
            f"  {where} (byte 0x{first * SECTOR:x}): expected {describe_expected(expected, origin)}, "
            f"read {describe_found(found, origin)}")
    if len(runs) > limit:
        lines.append(f"  ... {len(runs) - limit} more differing run(s), {len(differences)} sector(s) in all")
    return lines
