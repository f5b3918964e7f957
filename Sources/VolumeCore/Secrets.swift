// Comparing shared secrets (the cluster token) without telling, by the time taken, how much of a guess was right.

public enum Secrets {
    /// Compares without stopping at the first difference.
    public static func equal(_ a: String, _ b: String) -> Bool {
        let (x, y) = (Array(a.utf8), Array(b.utf8))
        var difference = UInt8(x.count == y.count ? 0 : 1)
        for index in 0..<min(x.count, y.count) { difference |= x[index] ^ y[index] }
        return difference == 0
    }
}
