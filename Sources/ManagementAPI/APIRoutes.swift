// The API's routes: a pure function from (method, path, body) to a response, so it is tested without sockets.
//
//   GET    /v1/volumes                                  list
//   POST   /v1/volumes                                  create        CreateVolumeRequest
//   POST   /v1/volumes/attach                           attach        AttachVolumeRequest
//   GET    /v1/volumes/NAME                             status
//   DELETE /v1/volumes/NAME                             delete
//   GET    /v1/volumes/NAME/snapshots                   list snapshots
//   POST   /v1/volumes/NAME/snapshots                   create        CreateSnapshotRequest
//   DELETE /v1/volumes/NAME/snapshots/SNAP              delete
//   POST   /v1/volumes/NAME/snapshots/SNAP/rollback     rollback      RollbackRequest
//   POST   /v1/volumes/NAME/snapshots/SNAP/clones       record or forget a clone of another router
//                                                                     CloneRegistrationRequest
//   POST   /v1/volumes/NAME/diff                        changed extents  DiffRequest
//   POST   /v1/volumes/NAME/export-diff                 write a stream   ExportDiffRequest
//   POST   /v1/volumes/NAME/import-diff                 apply a stream   ImportDiffRequest
//   POST   /v1/volumes/NAME/scrub-results               apply new scrub results now
//   POST   /v1/volumes/take                             take a volume released to this node   TakeVolumeRequest
//   POST   /v1/volumes/takeover                         take a volume whose owner is gone     TakeoverVolumeRequest
//   POST   /v1/volumes/NAME/move                        move to another node  MoveVolumeRequest
//   PUT    /v1/volumes/NAME/dtl                         DTL mode and peer     SetDTLRequest
//   GET    /v1/cluster/volumes[?backend=B]              every volume of a backend with its owner
//   POST   /v1/clones                                   clone         CreateCloneRequest
//   GET    /metrics                                     Prometheus text
// Errors: JSON {"code", "message"} with 400 (bad request), 404 (not found), 409 (exists, busy), 500 (the rest).

import FoundationEssentials
import VolumeCore

public struct APIResponse: Sendable {
    public var status: Int
    public var contentType: String
    public var body: [UInt8]

    static func json<T: Encodable>(_ value: T, status: Int = 200) -> APIResponse {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        guard let data = try? encoder.encode(value) else { return .error(VDError(.io, "cannot encode the response")) }
        return APIResponse(status: status, contentType: "application/json", body: Array(data))
    }

    static func error(_ error: VDError) -> APIResponse {
        let status: Int
        switch error.code {
        case .notFound: status = 404
        case .alreadyExists, .busy, .conflict, .dataLoss: status = 409
        case .invalidArgument, .outOfRange, .configuration: status = 400
        case .readOnly: status = 403
        case .unsupported: status = 405
        default: status = 500
        }
        return .json(APIError(error), status: status)
    }

    static let empty = APIResponse(status: 204, contentType: "application/json", body: [])
}

struct Empty: Codable {}

public enum APIRoutes {
    public static func handle(
        method: String, path: String, body: [UInt8], service: any ManagementService
    ) async
        -> APIResponse
    {
        let parts = path.split(separator: "?").first.map { $0.split(separator: "/").map(String.init) } ?? []
        do throws(VDError) {
            switch (method, parts) {
            case ("GET", ["v1", "volumes"]):
                return .json(try await service.listVolumes())
            case ("POST", ["v1", "volumes"]):
                return .json(try await service.createVolume(try decode(body)), status: 201)
            case ("POST", ["v1", "volumes", "attach"]):
                return .json(try await service.attachVolume(try decode(body)), status: 201)
            case ("GET", let p) where p.count == 3 && p[0] == "v1" && p[1] == "volumes":
                return .json(try await service.volumeStatus(p[2]))
            case ("DELETE", let p) where p.count == 3 && p[0] == "v1" && p[1] == "volumes":
                try await service.deleteVolume(p[2])
                return .empty
            case ("GET", let p) where p.count == 4 && p[0] == "v1" && p[1] == "volumes" && p[3] == "snapshots":
                return .json(try await service.listSnapshots(p[2]))
            case ("POST", let p) where p.count == 4 && p[0] == "v1" && p[1] == "volumes" && p[3] == "snapshots":
                return .json(try await service.createSnapshot(p[2], try decode(body)), status: 201)
            case ("DELETE", let p) where p.count == 5 && p[0] == "v1" && p[1] == "volumes" && p[3] == "snapshots":
                try await service.deleteSnapshot(p[2], p[4])
                return .empty
            case ("POST", let p)
            where p.count == 6 && p[0] == "v1" && p[1] == "volumes" && p[3] == "snapshots" && p[5] == "rollback":
                return .json(try await service.rollback(p[2], p[4], try decode(body)))
            case ("POST", let p)
            where p.count == 6 && p[0] == "v1" && p[1] == "volumes" && p[3] == "snapshots" && p[5] == "clones":
                return .json(try await service.registerClone(p[2], p[4], try decode(body)))
            case ("POST", let p) where p.count == 4 && p[0] == "v1" && p[1] == "volumes" && p[3] == "scrub-results":
                try await service.applyScrubResults(p[2])
                return .empty
            case ("POST", let p) where p.count == 4 && p[0] == "v1" && p[1] == "volumes" && p[3] == "diff":
                return .json(try await service.diff(p[2], try decode(body)))
            case ("POST", let p) where p.count == 4 && p[0] == "v1" && p[1] == "volumes" && p[3] == "export-diff":
                return .json(try await service.exportDiff(p[2], try decode(body)))
            case ("POST", let p) where p.count == 4 && p[0] == "v1" && p[1] == "volumes" && p[3] == "import-diff":
                return .json(try await service.importDiff(p[2], try decode(body)))
            case ("POST", ["v1", "volumes", "takeover"]):
                return .json(try await service.takeoverVolume(try decode(body)))
            case ("GET", ["v1", "cluster", "volumes"]):
                return .json(try await service.clusterVolumes(backend: query(path)["backend"]))
            case ("POST", ["v1", "volumes", "take"]):
                return .json(try await service.takeVolume(try decode(body)))
            case ("POST", let p) where p.count == 4 && p[0] == "v1" && p[1] == "volumes" && p[3] == "move":
                return .json(try await service.moveVolume(p[2], try decode(body)))
            case ("PUT", let p) where p.count == 4 && p[0] == "v1" && p[1] == "volumes" && p[3] == "dtl":
                return .json(try await service.setVolumeDTL(p[2], try decode(body)))
            case ("POST", ["v1", "clones"]):
                return .json(try await service.createClone(try decode(body)), status: 201)
            case ("GET", ["metrics"]):
                return APIResponse(
                    status: 200, contentType: "text/plain; version=0.0.4", body: Array(try await service.metrics().utf8)
                )
            default:
                return .error(VDError(.notFound, "no such API endpoint: \(method) \(path)"))
            }
        } catch {
            return .error(error)
        }
    }

    /// The query parameters of a path (`?a=b&c=d`, percent-decoded).
    static func query(_ path: String) -> [String: String] {
        guard let question = path.firstIndex(of: "?") else { return [:] }
        var result: [String: String] = [:]
        for pair in path[path.index(after: question)...].split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1).map { percentDecoded(String($0)) }
            if parts.count == 2 { result[parts[0]] = parts[1] }
        }
        return result
    }

    /// Every byte but letters, digits and `-._~` as %XX.
    public static func percentEncoded(_ text: String) -> String {
        var out = ""
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"),
                UInt8(ascii: "~"):
                out.unicodeScalars.append(Unicode.Scalar(byte))
            default:
                let hex = String(byte, radix: 16, uppercase: true)
                out += "%" + (hex.count == 1 ? "0" : "") + hex
            }
        }
        return out
    }

    static func percentDecoded(_ text: String) -> String {
        var bytes: [UInt8] = []
        var utf8 = Array(text.utf8)[...]
        while let byte = utf8.popFirst() {
            if byte == UInt8(ascii: "%"), utf8.count >= 2,
                let value = UInt8(String(decoding: utf8.prefix(2), as: UTF8.self), radix: 16)
            {
                bytes.append(value)
                utf8 = utf8.dropFirst(2)
            } else {
                bytes.append(byte == UInt8(ascii: "+") ? UInt8(ascii: " ") : byte)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    static func decode<T: Decodable>(_ body: [UInt8]) throws(VDError) -> T {
        do {
            return try JSONDecoder().decode(T.self, from: Data(body))
        } catch {
            throw VDError(.invalidArgument, "the request body is not a valid \(T.self): \(error)")
        }
    }
}
