// NBDProtocol
// The numbers of the NBD wire protocol (doc: the NBD protocol spec, "Values" section): magics, handshake and
// transmission flags, option and reply codes, command types and flags, error values. Nothing here does I/O; every
// other file of the target speaks in these names so a reader can check each against the spec.

/// Magic numbers of the NBD wire protocol.
package enum NBDMagic {
    /// `NBDMAGIC`, the first 8 bytes the server sends.
    package static let initPassword: UInt64 = 0x4e42_444d_4147_4943
    /// `IHAVEOPT`: follows `NBDMAGIC` in the greeting and starts every option the client sends.
    package static let option: UInt64 = 0x4948_4156_454F_5054
    /// Starts every option reply of fixed newstyle negotiation.
    package static let optionReply: UInt64 = 0x0003_e889_0455_65a9
    /// `NBD_REQUEST_MAGIC`: starts every transmission request.
    package static let request: UInt32 = 0x2560_9513
    /// `NBD_EXTENDED_REQUEST_MAGIC` (experimental extension we do not negotiate: seeing it is a protocol violation).
    package static let extendedRequest: UInt32 = 0x21e4_1c71
    /// `NBD_SIMPLE_REPLY_MAGIC`.
    package static let simpleReply: UInt32 = 0x6744_6698
    /// `NBD_STRUCTURED_REPLY_MAGIC`.
    package static let structuredReply: UInt32 = 0x668e_33ef
}

/// Handshake flags (server, 16 bits) and client flags (32 bits).
package enum NBDHandshakeFlags {
    package static let fixedNewstyle: UInt16 = 1 << 0
    package static let noZeroes: UInt16 = 1 << 1
    package static let clientFixedNewstyle: UInt32 = 1 << 0
    package static let clientNoZeroes: UInt32 = 1 << 1
    /// Every client flag this server understands; any other bit makes the server drop the connection.
    package static let clientKnown: UInt32 = clientFixedNewstyle | clientNoZeroes
}

/// Transmission flags (16 bits), sent with the export size when transmission starts.
package enum NBDTransmissionFlags {
    package static let hasFlags: UInt16 = 1 << 0
    package static let readOnly: UInt16 = 1 << 1
    package static let sendFlush: UInt16 = 1 << 2
    package static let sendFUA: UInt16 = 1 << 3
    package static let rotational: UInt16 = 1 << 4
    package static let sendTrim: UInt16 = 1 << 5
    package static let sendWriteZeroes: UInt16 = 1 << 6
    package static let sendDF: UInt16 = 1 << 7
    package static let canMultiConn: UInt16 = 1 << 8
    package static let sendCache: UInt16 = 1 << 10
    package static let sendFastZero: UInt16 = 1 << 11
}

/// Option codes a client sends during option haggling.
package enum NBDOption {
    package static let exportName: UInt32 = 1
    package static let abort: UInt32 = 2
    package static let list: UInt32 = 3
    package static let peekExport: UInt32 = 4
    package static let startTLS: UInt32 = 5
    package static let info: UInt32 = 6
    package static let go: UInt32 = 7
    package static let structuredReply: UInt32 = 8
    package static let listMetaContext: UInt32 = 9
    package static let setMetaContext: UInt32 = 10
    package static let extendedHeaders: UInt32 = 11
}

/// Option reply types. Error replies have bit 31 set.
package enum NBDOptionReply {
    package static let ack: UInt32 = 1
    package static let server: UInt32 = 2
    package static let info: UInt32 = 3
    package static let metaContext: UInt32 = 4
    package static let errorUnsupported: UInt32 = 0x8000_0001
    package static let errorPolicy: UInt32 = 0x8000_0002
    package static let errorInvalid: UInt32 = 0x8000_0003
    package static let errorPlatform: UInt32 = 0x8000_0004
    package static let errorTLSRequired: UInt32 = 0x8000_0005
    package static let errorUnknown: UInt32 = 0x8000_0006
    package static let errorShutdown: UInt32 = 0x8000_0007
    package static let errorBlockSizeRequired: UInt32 = 0x8000_0008
    package static let errorTooBig: UInt32 = 0x8000_0009
}

/// Information types of `NBD_OPT_INFO` / `NBD_OPT_GO` requests and `NBD_REP_INFO` replies.
package enum NBDInfo {
    package static let export: UInt16 = 0
    package static let name: UInt16 = 1
    package static let description: UInt16 = 2
    package static let blockSize: UInt16 = 3
}

/// Transmission request types.
package enum NBDCommand {
    package static let read: UInt16 = 0
    package static let write: UInt16 = 1
    package static let disconnect: UInt16 = 2
    package static let flush: UInt16 = 3
    package static let trim: UInt16 = 4
    package static let cache: UInt16 = 5
    package static let writeZeroes: UInt16 = 6
    package static let blockStatus: UInt16 = 7
}

/// Command flags (16 bits) of a transmission request.
package enum NBDCommandFlags {
    package static let fua: UInt16 = 1 << 0
    package static let noHole: UInt16 = 1 << 1
    package static let doNotFragment: UInt16 = 1 << 2
    package static let requestOne: UInt16 = 1 << 3
    package static let fastZero: UInt16 = 1 << 4
}

/// Structured reply chunk types and flags.
package enum NBDReplyChunk {
    package static let flagDone: UInt16 = 1 << 0
    package static let typeNone: UInt16 = 0
    package static let typeOffsetData: UInt16 = 1
    package static let typeOffsetHole: UInt16 = 2
    package static let typeBlockStatus: UInt16 = 5
    package static let typeError: UInt16 = 0x8001
    package static let typeErrorOffset: UInt16 = 0x8002
}

/// Flags of the `base:allocation` metadata context.
package enum NBDAllocationState {
    package static let hole: UInt32 = 1 << 0
    package static let zero: UInt32 = 1 << 1
}

/// The error values of the transmission phase (not the host's errno: the spec fixes these numbers).
package enum NBDErrno {
    package static let perm: UInt32 = 1
    package static let io: UInt32 = 5
    package static let noMemory: UInt32 = 12
    package static let invalid: UInt32 = 22
    package static let noSpace: UInt32 = 28
    package static let overflow: UInt32 = 75
    package static let notSupported: UInt32 = 95
    package static let shutdown: UInt32 = 108
}

/// Sizes and bounds of the wire format.
package enum NBDWire {
    /// The server greeting: `NBDMAGIC`, `IHAVEOPT`, 16-bit handshake flags.
    package static let greetingBytes = 18
    package static let clientFlagsBytes = 4
    /// `IHAVEOPT` (8), option (4), length (4).
    package static let optionHeaderBytes = 16
    /// magic (4), flags (2), type (2), cookie (8), offset (8), length (4).
    package static let requestHeaderBytes = 28
    package static let simpleReplyBytes = 16
    /// magic (4), flags (2), type (2), cookie (8), length (4).
    package static let structuredReplyHeaderBytes = 20
    /// The spec's bound on strings (export names, error messages, context names).
    package static let stringBytesMax = 4096
    /// The name of the one metadata context we serve.
    package static let allocationContextName = "base:allocation"
    /// The id we give `base:allocation` in `NBD_REP_META_CONTEXT` replies to `NBD_OPT_SET_META_CONTEXT`.
    package static let allocationContextID: UInt32 = 1
    /// `qemu:dirty-bitmap:NAME` (QEMU's meta context: flag 1 = dirty), with the id we give the selected one.
    package static let dirtyBitmapContextPrefix = "qemu:dirty-bitmap:"
    package static let dirtyBitmapContextID: UInt32 = 2
    package static let dirtyFlag: UInt32 = 1
    /// The spec's bound on descriptors in one block status chunk.
    package static let blockStatusDescriptorsMax = 1 << 20
}
