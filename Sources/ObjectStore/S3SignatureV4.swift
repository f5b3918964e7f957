// AWS Signature Version 4 for S3 requests (the "Authorization header" form), as specified in the AWS reference
// "Signature Version 4 signing process" and "Authenticating Requests: Using the Authorization Header (AWS Signature
// Version 4)". Pure computation on swift-crypto: the transport (S3HTTPTransport) calls it for every attempt, with
// the attempt's own time, so a retried request is signed afresh.
//
// Canonical request: METHOD \n URI-encoded path (each segment, '/' kept) \n sorted, URI-encoded query \n
// lower-case sorted headers "name:trimmed value\n" \n signed header names joined by ';' \n payload hash.
// String to sign: "AWS4-HMAC-SHA256" \n amz-date \n scope (date/region/s3/aws4_request) \n hex(SHA256(canonical)).
// Signing key: HMAC chain "AWS4"+secret -> date -> region -> "s3" -> "aws4_request".

import Crypto

package enum S3SignatureV4 {
    /// The payload hash sent when the body is not hashed into the signature (its integrity then rests on
    /// Content-MD5, which is a signed header).
    package static let unsignedPayload = "UNSIGNED-PAYLOAD"
    /// SHA256 of the empty string: the payload hash of a request without a body.
    package static let emptyPayloadHash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

    /// A request's parts that the signature covers.
    package struct Request: Sendable {
        package var method: String
        /// The path as sent, already URI-encoded (`S3SignatureV4.encodePath`).
        package var encodedPath: String
        /// Query parameters, not encoded (a parameter without a value has value "").
        package var query: [(String, String)]
        /// Headers to sign (host included); names in any case.
        package var headers: [(String, String)]
        package var payloadHash: String

        package init(
            method: String, encodedPath: String, query: [(String, String)], headers: [(String, String)],
            payloadHash: String
        ) {
            self.method = method
            self.encodedPath = encodedPath
            self.query = query
            self.headers = headers
            self.payloadHash = payloadHash
        }
    }

    /// The UTC time of a request in the two forms V4 uses: `20130524T000000Z` and `20130524`.
    package struct Time: Sendable, Equatable {
        package var amzDate: String
        package var date: String { String(amzDate.prefix(8)) }

        package init(amzDate: String) { self.amzDate = amzDate }

        /// From seconds since 1970 (UTC), without any non-reentrant libc call.
        package init(secondsSince1970 seconds: Int64) {
            let days = seconds >= 0 ? seconds / 86_400 : (seconds - 86_399) / 86_400
            let secondOfDay = seconds - days * 86_400
            // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
            let z = days + 719_468
            let era = (z >= 0 ? z : z - 146_096) / 146_097
            let dayOfEra = z - era * 146_097
            let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36_524 - dayOfEra / 146_096) / 365
            let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
            let monthIndex = (5 * dayOfYear + 2) / 153
            let day = dayOfYear - (153 * monthIndex + 2) / 5 + 1
            let month = monthIndex < 10 ? monthIndex + 3 : monthIndex - 9
            let year = yearOfEra + era * 400 + (month <= 2 ? 1 : 0)
            func pad(_ value: Int64, _ width: Int) -> String {
                let text = String(value)
                return String(repeating: "0", count: max(0, width - text.count)) + text
            }
            amzDate =
                pad(year, 4) + pad(month, 2) + pad(day, 2) + "T" + pad(secondOfDay / 3600, 2)
                + pad(secondOfDay / 60 % 60, 2) + pad(secondOfDay % 60, 2) + "Z"
        }
    }

    /// The headers to add to `request` (`x-amz-date`, `x-amz-content-sha256`, `authorization`). `request.headers`
    /// must already hold `host` and every other header that is to be signed.
    package static func sign(
        _ request: Request, time: Time, region: String, accessKeyID: String, secret: S3Secret
    ) -> [(String, String)] {
        var headers = request.headers.map { ($0.0.lowercased(), trimmed($0.1)) }
        headers.append(("x-amz-date", time.amzDate))
        headers.append(("x-amz-content-sha256", request.payloadHash))
        headers.sort { $0.0 < $1.0 }
        let signedHeaders = headers.map(\.0).joined(separator: ";")
        let canonicalQuery = canonicalQueryString(request.query)
        let path: String = request.encodedPath.isEmpty ? "/" : request.encodedPath
        var canonicalHeaders = ""
        for (name, value) in headers { canonicalHeaders += name + ":" + value + "\n" }
        let parts: [String] = [
            request.method, path, canonicalQuery, canonicalHeaders, signedHeaders, request.payloadHash,
        ]
        let canonicalRequest = parts.joined(separator: "\n")
        let scope = "\(time.date)/\(region)/s3/aws4_request"
        let stringToSign = [
            "AWS4-HMAC-SHA256", time.amzDate, scope, hex(SHA256.hash(data: Array(canonicalRequest.utf8))),
        ].joined(separator: "\n")
        let signature = hex(hmac(signingKey(secret: secret, date: time.date, region: region), stringToSign))
        return [
            ("x-amz-date", time.amzDate),
            ("x-amz-content-sha256", request.payloadHash),
            (
                "authorization",
                "AWS4-HMAC-SHA256 Credential=\(accessKeyID)/\(scope), SignedHeaders=\(signedHeaders), "
                    + "Signature=\(signature)"
            ),
        ]
    }

    /// Query parameters encoded and sorted by name (then value), joined as `a=1&b=2`: both what is signed and what
    /// is sent.
    package static func canonicalQueryString(_ query: [(String, String)]) -> String {
        var pairs: [(String, String)] = []
        for (name, value) in query { pairs.append((encode(name, keepSlash: false), encode(value, keepSlash: false))) }
        pairs.sort { (left: (String, String), right: (String, String)) -> Bool in
            left.0 == right.0 ? left.1 < right.1 : left.0 < right.0
        }
        var out: [String] = []
        for (name, value) in pairs { out.append(name + "=" + value) }
        return out.joined(separator: "&")
    }

    /// URI-encodes a path (each segment; '/' kept) the way S3 signs it.
    package static func encodePath(_ path: String) -> String { encode(path, keepSlash: true) }

    /// RFC 3986 encoding: unreserved characters (A-Z a-z 0-9 - _ . ~) stay, every other byte becomes %XY.
    package static func encode(_ text: String, keepSlash: Bool) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(text.utf8.count)
        let hexDigits = Array("0123456789ABCDEF".utf8)
        for byte in text.utf8 {
            let unreserved =
                (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A) || (byte >= 0x30 && byte <= 0x39)
                || byte == UInt8(ascii: "-") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: ".")
                || byte == UInt8(ascii: "~")
            if unreserved || (keepSlash && byte == UInt8(ascii: "/")) {
                out.append(byte)
            } else {
                out.append(UInt8(ascii: "%"))
                out.append(hexDigits[Int(byte >> 4)])
                out.append(hexDigits[Int(byte & 15)])
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    package static func sha256Hex(_ bytes: UnsafeRawBufferPointer) -> String { hex(SHA256.hash(data: bytes)) }

    private static func signingKey(secret: S3Secret, date: String, region: String) -> SymmetricKey {
        let dateKey = hmac(SymmetricKey(data: Array(("AWS4" + secret.value).utf8)), date)
        let regionKey = hmac(SymmetricKey(data: dateKey), region)
        let serviceKey = hmac(SymmetricKey(data: regionKey), "s3")
        return SymmetricKey(data: hmac(SymmetricKey(data: serviceKey), "aws4_request"))
    }

    private static func hmac(_ key: SymmetricKey, _ message: String) -> [UInt8] {
        Array(HMAC<SHA256>.authenticationCode(for: Array(message.utf8), using: key))
    }

    private static func hex<D: Sequence>(_ digest: D) -> String where D.Element == UInt8 {
        S3Encoding.hex(Array(digest))
    }

    /// Header values are signed with leading and trailing spaces removed and inner runs of spaces collapsed.
    private static func trimmed(_ value: String) -> String {
        value.split(separator: " ", omittingEmptySubsequences: true).joined(separator: " ")
    }
}
