// Value types shared by every layer: names, numbers, locations and the limits that bound them.

/// Index of a cluster in a volume: byte offset divided by the volume's cluster size.
public typealias ClusterAddress = UInt64

/// The sequence number of an SCO and of the TLog that describes it (one SCO and one TLog per epoch). Numbers start at
/// 1, grow by one per epoch and are never reused, so every object name in a namespace is unique forever.
public struct SCONumber: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public init(_ value: UInt64) { self.rawValue = value }
    @inlinable public static func < (a: SCONumber, b: SCONumber) -> Bool { a.rawValue < b.rawValue }
    public var next: SCONumber { SCONumber(rawValue + 1) }
    /// 16 lower-case hex digits: object names sort in sequence order.
    public var hex: String {
        let digits = String(rawValue, radix: 16)
        return String(repeating: "0", count: 16 - digits.count) + digits
    }
    public var description: String { hex }
    /// Parses the 16-digit hex form used in object and file names.
    public init?(hex: Substring) {
        guard hex.count == 16, let value = UInt64(hex, radix: 16) else { return nil }
        self.rawValue = value
    }
}

/// Where one cluster's payload lives: an SCO of the volume, the payload's byte offset in it, and the CRC32C of the
/// (uncompressed) cluster payload, verified on every read.
public struct ClusterLocation: Hashable, Sendable, CustomStringConvertible {
    public var sco: SCONumber
    public var offset: UInt32
    public var crc: UInt32
    @inlinable
    public init(sco: SCONumber, offset: UInt32, crc: UInt32) {
        self.sco = sco
        self.offset = offset
        self.crc = crc
    }
    public var description: String { "sco \(sco.hex) offset \(offset) crc \(String(crc, radix: 16))" }
}

/// Named bounds. Units last. Checked at start-up and on every request that could exceed them.
public enum Limits {
    public static let sectorSizeBytes: UInt64 = 512
    public static let clusterSizeBytesMin: UInt32 = 4096
    public static let clusterSizeBytesMax: UInt32 = 65536
    public static let clusterSizeBytesDefault: UInt32 = 4096
    /// SCO payload offsets are 32-bit.
    public static let scoSizeBytesMin: UInt64 = 1 << 20
    public static let scoSizeBytesMax: UInt64 = 1 << 30
    public static let scoSizeBytesDefault: UInt64 = 64 << 20
    /// Largest virtual disk: 2^50 bytes (1 PiB), comfortably inside 64-bit sector arithmetic.
    public static let volumeSizeBytesMax: UInt64 = 1 << 50
    /// Largest single read or write request the engine accepts (the NBD server advertises this).
    public static let requestBytesMax: UInt32 = 32 << 20
    /// Volume names: letters, digits, '.', '_' and '-', starting with a letter or digit.
    public static let volumeNameLengthMax = 64
}

/// A validated volume name. '@' is reserved for snapshot exports (`VOLUME@SNAPSHOT`), '/' for namespaces.
public struct VolumeName: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible, Codable {
    public let rawValue: String
    public init?(rawValue: String) {
        guard (try? VolumeName.validate(rawValue)) != nil else { return nil }
        self.rawValue = rawValue
    }
    public init(validating name: String) throws(VDError) {
        try VolumeName.validate(name)
        self.rawValue = name
    }
    public var description: String { rawValue }
    public static func < (a: VolumeName, b: VolumeName) -> Bool { a.rawValue < b.rawValue }

    public static func validate(_ name: String) throws(VDError) {
        let what = "volume name '\(name)'"
        guard !name.isEmpty else { throw .invalidArgument("the volume name is empty") }
        guard name.utf8.count <= Limits.volumeNameLengthMax else {
            throw .invalidArgument("\(what) is longer than \(Limits.volumeNameLengthMax) characters")
        }
        for (index, byte) in name.utf8.enumerated() {
            let isAlnum =
                (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z"))
                || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
                || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9"))
            let isPunct = byte == UInt8(ascii: "-") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: ".")
            if index == 0 && !isAlnum {
                throw .invalidArgument("\(what) must start with a letter or a digit")
            }
            if !isAlnum && !isPunct {
                throw .invalidArgument("\(what) may contain only letters, digits, '.', '_' and '-'")
            }
        }
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        let raw = try container.decode(String.self)
        try self.init(validating: raw)
    }
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(rawValue)
    }
}

/// Byte sizes as users type them: `20G`, `512M`, `4K`, `1T`, `4096` (binary multiples; an optional `B`/`iB`).
public enum ByteSize {
    public static func parse(_ text: String) throws(VDError) -> UInt64 {
        var digits = Substring(text.trimmingSpaces())
        guard !digits.isEmpty else { throw .invalidArgument("the size is empty; use e.g. 20G, 512M or 4096") }
        let original = digits
        let lower = digits.lowercased()
        if lower.hasSuffix("ib") {
            digits = digits.dropLast(2)
        } else if lower.hasSuffix("b") {
            digits = digits.dropLast(1)
        }
        var shift: UInt64 = 0
        if let last = digits.last?.lowercased().first {
            switch last {
            case "k": shift = 10
            case "m": shift = 20
            case "g": shift = 30
            case "t": shift = 40
            case "p": shift = 50
            default: shift = 0
            }
            if shift > 0 { digits = digits.dropLast() }
        }
        guard let value = UInt64(digits), !digits.isEmpty else {
            throw .invalidArgument(
                "'\(original)' is not a size; use a whole number with an optional K, M, G or T suffix (e.g. 20G)")
        }
        let (result, overflow) = value.multipliedReportingOverflow(by: UInt64(1) << shift)
        guard !overflow else { throw .invalidArgument("the size '\(original)' is too large") }
        return result
    }

    /// `21474836480` -> `20 GiB`, `1536` -> `1.5 KiB`.
    public static func format(_ bytes: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
        var value = Double(bytes)
        var unit = 0
        while value >= 1024 && unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        if unit == 0 { return "\(bytes) B" }
        let rounded = (value * 10).rounded() / 10
        if rounded == rounded.rounded() { return "\(Int(rounded)) \(units[unit])" }
        return "\(rounded) \(units[unit])"
    }
}

extension String {
    fileprivate func trimmingSpaces() -> String {
        var s = Substring(self)
        while s.first == " " || s.first == "\t" { s = s.dropFirst() }
        while s.last == " " || s.last == "\t" { s = s.dropLast() }
        return String(s)
    }
}
