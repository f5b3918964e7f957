// NBDInboundBuffer
// Holds the bytes received from one client until they are decoded, without copying what need not be copied: frames
// that lie wholly inside one received buffer are decoded in place (a WRITE payload is a slice of the buffer the
// socket read into); only a frame that spans two reads is assembled into a buffer of its exact size.
//
// Faults it must survive: frames cut at any byte, a decoder that skips (consumes without producing) a payload, and
// reading being paused with decoded-but-unprocessed bytes still queued. Memory is bounded by the received buffers of
// one read cycle plus one frame (the decoders bound frames).

package import NIOCore

/// The bytes received from a client that have not been decoded yet.
package struct NBDInboundBuffer {
    /// Received buffers, oldest first, not yet looked at by the decoder.
    private var queue = CircularBuffer<ByteBuffer>(initialCapacity: 4)
    /// The start of one frame that spans received buffers, and how many bytes it still lacks.
    private var partial: ByteBuffer?
    private var partialBytesMissing = 0
    private let allocator: ByteBufferAllocator

    package init(allocator: ByteBufferAllocator = ByteBufferAllocator()) {
        self.allocator = allocator
    }

    /// Bytes received and not yet decoded.
    package var bufferedBytes: Int {
        var total = partial?.readableBytes ?? 0
        for buffer in queue { total += buffer.readableBytes }
        return total
    }

    /// Queues bytes received from the client.
    package mutating func append(_ buffer: ByteBuffer) {
        guard buffer.readableBytes > 0 else { return }
        queue.append(buffer)
    }

    /// Drops everything buffered (the connection is closing).
    package mutating func removeAll() {
        queue.removeAll()
        partial = nil
        partialBytesMissing = 0
    }

    /// Decodes the next frame, or returns nil when more bytes are needed.
    package mutating func nextFrame<Decoder: NBDFrameDecoder>(
        _ decoder: inout Decoder
    ) throws(NBDDecodingError) -> Decoder.Frame? {
        while true {
            if partial != nil {
                // Move the buffer out before writing to it: a second reference would make every append copy it.
                var assembling = partial!
                partial = nil
                // Top the spanning frame up with exactly the bytes it lacks.
                while partialBytesMissing > 0, var front = queue.first {
                    let taken = min(partialBytesMissing, front.readableBytes)
                    let slice = front.readSlice(length: taken)!
                    assembling.writeImmutableBuffer(slice)
                    partialBytesMissing -= taken
                    if front.readableBytes == 0 {
                        queue.removeFirst()
                    } else {
                        queue[queue.startIndex] = front
                    }
                }
                guard partialBytesMissing == 0 else {
                    partial = assembling
                    return nil
                }
                switch try decoder.decode(&assembling) {
                case .frame(let frame):
                    if assembling.readableBytes > 0 { queue.prepend(assembling) }
                    return frame
                case .needMoreBytes(let count):
                    if assembling.readableBytes > 0 {
                        // Now the header is known, the frame needs its payload too.
                        assembling.reserveCapacity(minimumWritableBytes: count)
                        partial = assembling
                        partialBytesMissing = count
                    }
                    continue
                }
            }

            guard var front = queue.popFirst() else { return nil }
            switch try decoder.decode(&front) {
            case .frame(let frame):
                if front.readableBytes > 0 { queue.prepend(front) }
                return frame
            case .needMoreBytes(let count):
                if front.readableBytes > 0 {
                    var assembling = allocator.buffer(capacity: front.readableBytes + count)
                    assembling.writeBuffer(&front)
                    partial = assembling
                    partialBytesMissing = count
                }
            }
        }
    }
}
