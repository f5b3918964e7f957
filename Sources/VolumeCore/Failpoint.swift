// Crash points for tests: with VD_FAILPOINT=NAME in the environment, the process kills itself (SIGKILL, as kill -9
// would) when it reaches the point NAME. Free when the variable is unset.

#if canImport(Glibc)
    @preconcurrency import Glibc
#endif

package enum Failpoint {
    private static let armed: String? = getenv("VD_FAILPOINT").map { String(cString: $0) }

    package static func hit(_ name: String) {
        guard let armed, armed == name else { return }
        kill(getpid(), SIGKILL)
    }
}
