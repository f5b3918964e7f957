// Signature V4 against the worked examples of the AWS S3 reference ("Examples: Signature Calculations in AWS
// Signature Version 4"): the same inputs must give the same signature, byte for byte.

import Testing

@testable import ObjectStore

@Suite struct S3SignatureV4Tests {
    let secret = S3Secret("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    let time = S3SignatureV4.Time(amzDate: "20130524T000000Z")

    func signature(_ headers: [(String, String)]) -> String {
        let authorization = headers.first { $0.0 == "authorization" }?.1 ?? ""
        return String(authorization.split(separator: "Signature=").last ?? "")
    }

    @Test func getObjectExample() {
        let request = S3SignatureV4.Request(
            method: "GET", encodedPath: "/test.txt", query: [],
            headers: [("Host", "examplebucket.s3.amazonaws.com"), ("Range", "bytes=0-9")],
            payloadHash: S3SignatureV4.emptyPayloadHash)
        let headers = S3SignatureV4.sign(
            request, time: time, region: "us-east-1", accessKeyID: "AKIAIOSFODNN7EXAMPLE", secret: secret)
        #expect(signature(headers) == "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
        #expect(
            headers.first { $0.0 == "authorization" }?.1.hasPrefix(
                "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
                    + "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature=") == true)
    }

    @Test func listObjectsExample() {
        let request = S3SignatureV4.Request(
            method: "GET", encodedPath: "/", query: [("max-keys", "2"), ("prefix", "J")],
            headers: [("Host", "examplebucket.s3.amazonaws.com")], payloadHash: S3SignatureV4.emptyPayloadHash)
        let headers = S3SignatureV4.sign(
            request, time: time, region: "us-east-1", accessKeyID: "AKIAIOSFODNN7EXAMPLE", secret: secret)
        #expect(signature(headers) == "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7")
    }

    @Test func aWrongSecretOrRegionChangesTheSignature() {
        let request = S3SignatureV4.Request(
            method: "GET", encodedPath: "/test.txt", query: [],
            headers: [("Host", "examplebucket.s3.amazonaws.com"), ("Range", "bytes=0-9")],
            payloadHash: S3SignatureV4.emptyPayloadHash)
        let good = signature(
            S3SignatureV4.sign(request, time: time, region: "us-east-1", accessKeyID: "AKID", secret: secret))
        let otherRegion = signature(
            S3SignatureV4.sign(request, time: time, region: "eu-west-1", accessKeyID: "AKID", secret: secret))
        let otherSecret = signature(
            S3SignatureV4.sign(request, time: time, region: "us-east-1", accessKeyID: "AKID", secret: S3Secret("x")))
        #expect(good != otherRegion && good != otherSecret && otherRegion != otherSecret)
    }

    @Test func timeFormatting() {
        #expect(S3SignatureV4.Time(secondsSince1970: 1_369_353_600).amzDate == "20130524T000000Z")
        #expect(S3SignatureV4.Time(secondsSince1970: 0).amzDate == "19700101T000000Z")
        #expect(S3SignatureV4.Time(secondsSince1970: 951_782_400 + 86_399).amzDate == "20000229T235959Z")
        #expect(S3SignatureV4.Time(secondsSince1970: 1_798_761_599).amzDate == "20261231T235959Z")
    }

    @Test func encoding() {
        #expect(S3SignatureV4.encodePath("/vol 1/sco/a+b~c") == "/vol%201/sco/a%2Bb~c")
        #expect(S3SignatureV4.encode("a/b=c", keepSlash: false) == "a%2Fb%3Dc")
    }
}
