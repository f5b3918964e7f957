// A network namespace joined to the host by a veth pair, for tests that cut a process off the network (the partition
// and DTL integration tests): the host side gets 10.SUBNET.TAG.1/30, the namespace 10.SUBNET.TAG.2/30 and loopback.

import Foundation

public struct VethNamespace: Sendable {
    public let name: String
    /// The host's end of the pair: `setLink(up:)` cuts or restores the namespace's only way out.
    public let hostSide: String
    public let hostAddress: String
    public let namespaceAddress: String
    /// Runs a command inside the namespace (`VDServer.launcher`).
    public var launcher: [String] { ["/usr/sbin/ip", "netns", "exec", name] }

    /// `prefix` names the namespace and links (short: interface names have 15 characters at most); `subnet` the
    /// second octet of its addresses.
    public init(prefix: String, subnet: Int) throws {
        let tag = String(UInt32.random(in: 0...UInt32.max) % 200 + 20)
        name = "\(prefix)\(tag)"
        hostSide = "\(prefix)h\(tag)"
        let inside = "\(prefix)n\(tag)"
        hostAddress = "10.\(subnet).\(tag).1"
        namespaceAddress = "10.\(subnet).\(tag).2"
        try Self.ip(["netns", "add", name])
        do {
            try Self.ip(["link", "add", hostSide, "type", "veth", "peer", "name", inside])
            try Self.ip(["link", "set", inside, "netns", name])
            try Self.ip(["addr", "add", hostAddress + "/30", "dev", hostSide])
            try Self.ip(["link", "set", hostSide, "up"])
            try Self.ip(["netns", "exec", name, "ip", "addr", "add", namespaceAddress + "/30", "dev", inside])
            try Self.ip(["netns", "exec", name, "ip", "link", "set", inside, "up"])
            try Self.ip(["netns", "exec", name, "ip", "link", "set", "lo", "up"])
        } catch {
            remove()
            throw error
        }
    }

    /// The host's end of the pair up or down.
    public func setLink(up: Bool) throws { try Self.ip(["link", "set", hostSide, up ? "up" : "down"]) }

    public func remove() {
        _ = try? ProcessRunner.run("/usr/sbin/ip", ["link", "del", hostSide])
        _ = try? ProcessRunner.run("/usr/sbin/ip", ["netns", "del", name])
    }

    static func ip(_ arguments: [String]) throws {
        let result = try ProcessRunner.run("/usr/sbin/ip", arguments)
        guard result.succeeded else {
            throw NSError(
                domain: "VethNamespace", code: Int(result.status),
                userInfo: [NSLocalizedDescriptionKey: "ip \(arguments.joined(separator: " ")): \(result.error)"])
        }
    }
}
