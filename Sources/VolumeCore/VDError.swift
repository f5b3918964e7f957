// The one error type of VolumeDriver: a code that callers and protocols can match on (the NBD server maps it to an
// NBD errno, the CLI to an exit status) and a message written for the operator.

/// An error raised anywhere in VolumeDriver. Equal codes mean the same kind of failure; the message says what and where.
public struct VDError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of failure this is. Stable: tests and protocol mappings match on it.
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        public var rawValue: String
        public init(rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }

        /// The caller passed something malformed (bad size, bad name, unaligned value).
        public static let invalidArgument = Code(rawValue: "invalid-argument")
        /// An offset or length falls outside the device or the object.
        public static let outOfRange = Code(rawValue: "out-of-range")
        /// A named thing (volume, object, snapshot, export) does not exist.
        public static let notFound = Code(rawValue: "not-found")
        /// A named thing already exists.
        public static let alreadyExists = Code(rawValue: "already-exists")
        /// A checksum, magic or version did not verify: the data is not returned.
        public static let corrupt = Code(rawValue: "corrupt")
        /// The operating system refused an I/O operation.
        public static let io = Code(rawValue: "io")
        /// The local disk is full.
        public static let noSpace = Code(rawValue: "no-space")
        /// Another process or operation holds what is needed.
        public static let busy = Code(rawValue: "busy")
        /// Writing to something read-only.
        public static let readOnly = Code(rawValue: "read-only")
        /// The object store failed (after retries) or refused the request.
        public static let backend = Code(rawValue: "backend")
        /// The object store rejected the credentials.
        public static let authentication = Code(rawValue: "authentication")
        /// An operation ran past its deadline.
        public static let timeout = Code(rawValue: "timeout")
        /// The component is shutting down or closed.
        public static let shutdown = Code(rawValue: "shutdown")
        /// The request is valid but not supported.
        public static let unsupported = Code(rawValue: "unsupported")
        /// The configuration is invalid.
        public static let configuration = Code(rawValue: "configuration")
        /// A compare-and-swap lost: another writer changed the record since it was read; nothing was written.
        public static let conflict = Code(rawValue: "conflict")
        /// Going on would lose acknowledged writes: it needs the caller's explicit acceptance.
        public static let dataLoss = Code(rawValue: "data-loss")
    }

    public var code: Code
    public var message: String
    /// The errno behind an `.io` / `.noSpace` error, when there is one.
    public var errno: Int32?

    public init(_ code: Code, _ message: String, errno: Int32? = nil) {
        self.code = code
        self.message = message
        self.errno = errno
    }

    public var description: String { message }
}

extension VDError {
    public static func invalidArgument(_ message: String) -> VDError { VDError(.invalidArgument, message) }
    public static func outOfRange(_ message: String) -> VDError { VDError(.outOfRange, message) }
    public static func notFound(_ message: String) -> VDError { VDError(.notFound, message) }
    public static func corrupt(_ message: String) -> VDError { VDError(.corrupt, message) }
    public static func shutdown(_ message: String) -> VDError { VDError(.shutdown, message) }
}

extension VDError {
    /// Runs `body`, passing VDErrors through and wrapping any other error as `code` (for closures of APIs that throw
    /// untyped errors).
    @inlinable
    public static func catching<T>(_ code: Code = .io, _ body: () throws -> T) throws(VDError) -> T {
        do {
            return try body()
        } catch let error as VDError {
            throw error
        } catch {
            throw VDError(code, "\(error)")
        }
    }
}
