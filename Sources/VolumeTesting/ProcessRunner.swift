// Running real programs from tests: the vd binary under test and the NBD clients (qemu-io, qemu-img, nbdinfo,
// nbdcopy, fio). A missing tool is a test failure that names the Debian package, never a silent skip.

public import Foundation

/// The outcome of a finished program.
public struct ProcessResult: Sendable {
    public var status: Int32
    public var output: String
    public var error: String
    public var succeeded: Bool { status == 0 }
    public init(status: Int32, output: String, error: String) {
        self.status = status
        self.output = output
        self.error = error
    }
}

public enum ProcessRunner {
    /// Debian packages that provide the tools tests use.
    public static let packages: [String: String] = [
        "qemu-io": "qemu-utils", "qemu-img": "qemu-utils", "qemu-nbd": "qemu-utils", "nbdinfo": "libnbd-bin",
        "nbdcopy": "libnbd-bin", "fio": "fio", "nbdfuse": "libnbd-bin", "fuse2fs": "fuse2fs", "fusermount3": "fuse3",
        "mkfs.ext4": "e2fsprogs", "e2fsck": "e2fsprogs",
    ]

    /// Absolute path of `tool` on PATH, or an error naming the package to install.
    public static func which(_ tool: String) throws -> String {
        if tool.hasPrefix("/") { return tool }
        for directory in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let candidate = "\(directory)/\(tool)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        let package = packages[tool].map { " (apt-get install \($0))" } ?? ""
        throw TestToolError(message: "\(tool) is not installed\(package); run the README's test command")
    }

    /// Runs a program to completion (with a timeout) and captures its output.
    @discardableResult
    public static func run(
        _ tool: String, _ arguments: [String], currentDirectory: String? = nil, environment: [String: String] = [:],
        timeoutSeconds: Double = 300
    ) throws -> ProcessResult {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try which(tool))
        process.arguments = arguments
        if let currentDirectory { process.currentDirectoryURL = URL(fileURLWithPath: currentDirectory) }
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        let out = Pipe()
        let err = Pipe()
        process.standardOutput = out
        process.standardError = err
        let outData = LockedData()
        let errData = LockedData()
        out.fileHandleForReading.readabilityHandler = { outData.append($0.availableData) }
        err.fileHandleForReading.readabilityHandler = { errData.append($0.availableData) }
        try process.run()
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning {
            process.terminate()
            process.waitUntilExit()
            throw TestToolError(
                message: "\(tool) \(arguments.joined(separator: " ")) timed out after \(timeoutSeconds) s")
        }
        process.waitUntilExit()
        out.fileHandleForReading.readabilityHandler = nil
        err.fileHandleForReading.readabilityHandler = nil
        outData.append(out.fileHandleForReading.readDataToEndOfFile())
        errData.append(err.fileHandleForReading.readDataToEndOfFile())
        return ProcessResult(
            status: process.terminationStatus, output: outData.string, error: errData.string)
    }
}

extension ProcessRunner {
    /// Starts a long-running program (output discarded); the caller terminates it.
    public static func start(_ tool: String, _ arguments: [String]) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try which(tool))
        process.arguments = arguments
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        return process
    }

    /// Starts a program with its output on /dev/null and returns its pid (reap it with `waitForExit`). Foundation's
    /// `Process` is not used: it waits for the end of pipes a daemonizing child would hold, and did not reap such a
    /// parent here.
    public static func spawn(_ tool: String, _ arguments: [String]) throws -> pid_t {
        let path = try which(tool)
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for fd: Int32 in [0, 1, 2] {
            posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", fd == 0 ? O_RDONLY : O_WRONLY, 0)
        }
        let argv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, path, &actions, nil, argv, environ)
        guard spawned == 0 else {
            throw TestToolError(message: "\(tool): posix_spawn failed (errno \(spawned))")
        }
        return pid
    }

    /// Waits for a spawned program to exit; its exit status (128 + signal if killed), or nil after `seconds`.
    public static func waitForExit(_ pid: pid_t, seconds: Double) -> Int32? {
        let deadline = Date().addingTimeInterval(seconds)
        var status: Int32 = 0
        while true {
            let reaped = waitpid(pid, &status, WNOHANG)
            if reaped == pid {
                // WIFEXITED / WEXITSTATUS by hand (the macros are not imported).
                return status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
            }
            if reaped < 0 && errno != EINTR { return nil }
            if Date() >= deadline { return nil }
            usleep(20_000)
        }
    }

    /// Whether `path` is a mount point now (/proc/mounts).
    public static func isMounted(_ path: String) -> Bool {
        guard let mounts = try? String(contentsOfFile: "/proc/mounts", encoding: .utf8) else { return false }
        return mounts.split(separator: "\n").contains { $0.split(separator: " ").dropFirst().first == Substring(path) }
    }

    /// Waits until `path` exists (a pid file a program writes once it is ready); false after `seconds`.
    public static func waitFor(path: String, seconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if FileManager.default.fileExists(atPath: path) { return true }
            usleep(20_000)
        }
        return false
    }
}

public struct TestToolError: Error, CustomStringConvertible {
    public var message: String
    public init(message: String) { self.message = message }
    public var description: String { message }
}

final class LockedData: @unchecked Sendable {
    private let lock = NSLock()
    private var data = Data()
    func append(_ more: Data) {
        lock.lock()
        data.append(more)
        lock.unlock()
    }
    var string: String {
        lock.lock()
        defer { lock.unlock() }
        return String(decoding: data, as: UTF8.self)
    }
}

/// A `vd serve` process under test.
public final class VDServer: @unchecked Sendable {
    public let binary: String
    public let dataDirectory: String
    public let socketPath: String
    public let extraArguments: [String]
    /// Extra environment for vd (e.g. AWS_ACCESS_KEY_ID for s3:// backends).
    public let environment: [String: String]
    /// A program `vd serve` runs under (e.g. `ip netns exec NS`), which execs it.
    public var launcher: [String] = []
    public private(set) var process: Process?
    private var log = LockedData()
    public let logPath: String

    /// The vd binary next to the test bundle (built by `swift build`), or $VD_BIN.
    public static func defaultBinary() throws -> String {
        if let bin = ProcessInfo.processInfo.environment["VD_BIN"], !bin.isEmpty { return bin }
        var directory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for _ in 0..<3 {
            let candidate = directory.appendingPathComponent("vd").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            directory = directory.deletingLastPathComponent()
        }
        for build in [".build/debug/vd", ".build/release/vd"] where FileManager.default.isExecutableFile(atPath: build)
        {
            return FileManager.default.currentDirectoryPath + "/" + build
        }
        throw TestToolError(message: "cannot find the vd binary: run `swift build` first or set VD_BIN")
    }

    /// A router of a cluster: `vd serve --config CONFIG --node NODE` on DIRECTORY/NODE, with the cluster token, and
    /// (`listen`) its cluster API on a free loopback port.
    public static func clusterNode(
        _ node: String, in directory: String, config: String, token: String, listen: Bool = true, dtl: Bool = false
    ) throws -> VDServer {
        try VDServer(
            dataDirectory: directory + "/" + node,
            extraArguments: ["--config", config, "--node", node] + (listen ? ["--cluster-listen", "127.0.0.1:0"] : [])
                + (dtl ? ["--dtl-listen", "127.0.0.1:0"] : []),
            environment: ["VD_CLUSTER_TOKEN": token])
    }

    public init(
        dataDirectory: String, socketPath: String? = nil, extraArguments: [String] = [],
        environment: [String: String] = [:]
    ) throws {
        binary = try Self.defaultBinary()
        self.dataDirectory = dataDirectory
        self.socketPath = socketPath ?? dataDirectory + "/nbd.sock"
        self.extraArguments = extraArguments
        self.environment = environment
        logPath = dataDirectory + ".serve.log"
    }

    public func uri(_ export: String) -> String { "nbd+unix:///\(export)?socket=\(socketPath)" }

    /// Runs `vd ARGS --data-dir DATA`.
    @discardableResult
    public func cli(_ arguments: [String]) throws -> ProcessResult {
        try ProcessRunner.run(binary, arguments + ["--data-dir", dataDirectory], environment: environment)
    }

    /// Starts `vd serve` and waits until it prints "ready" (or fails).
    public func start(timeoutSeconds: Double = 60) throws {
        let process = Process()
        let arguments = ["serve", "--data-dir", dataDirectory, "--nbd-socket", socketPath] + extraArguments
        if let program = launcher.first {
            process.executableURL = URL(fileURLWithPath: program)
            process.arguments = Array(launcher.dropFirst()) + [binary] + arguments
        } else {
            process.executableURL = URL(fileURLWithPath: binary)
            process.arguments = arguments
        }
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        let log = LockedData()
        self.log = log
        let logPath = self.logPath
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        let logHandle = FileHandle(forWritingAtPath: logPath)
        logHandle?.seekToEndOfFile()
        pipe.fileHandleForReading.readabilityHandler = { handle in
            let data = handle.availableData
            log.append(data)
            logHandle?.write(data)
        }
        try process.run()
        self.process = process
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while Date() < deadline {
            if log.string.contains("\nready") || log.string.hasPrefix("ready") { return }
            if !process.isRunning {
                throw TestToolError(message: "vd serve exited with \(process.terminationStatus):\n\(log.string)")
            }
            usleep(20_000)
        }
        throw TestToolError(message: "vd serve did not become ready in \(timeoutSeconds) s:\n\(log.string)")
    }

    public var output: String { log.string }
    public var pid: Int32 { process?.processIdentifier ?? 0 }

    /// kill -9.
    public func kill9() {
        guard let process, process.isRunning else { return }
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    /// SIGTERM, then waits for the exit status.
    @discardableResult
    public func stop(timeoutSeconds: Double = 120) throws -> Int32 {
        guard let process else { return 0 }
        if process.isRunning { kill(process.processIdentifier, SIGTERM) }
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            throw TestToolError(message: "vd serve did not stop within \(timeoutSeconds) s after SIGTERM")
        }
        return process.terminationStatus
    }
}

/// A temporary directory removed on `remove()`.
public struct TemporaryDirectory: Sendable {
    public let path: String
    public init(_ label: String = "vd") throws {
        let base = ProcessInfo.processInfo.environment["VD_TEST_TMP"] ?? NSTemporaryDirectory()
        path = base + (base.hasSuffix("/") ? "" : "/") + "\(label)-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    public func remove() { try? FileManager.default.removeItem(atPath: path) }
}

/// A program run to completion on a thread of its own (`ProcessRunner.run`), for tests that run several at once.
public final class BackgroundRun: @unchecked Sendable {
    private let done = DispatchSemaphore(value: 0)
    // Written once by the thread before `done` is signalled; read only after waiting for it.
    private var result: Result<ProcessResult, any Error>?

    init(_ body: @escaping @Sendable () throws -> ProcessResult) {
        Thread { [self] in
            result = Result { try body() }
            done.signal()
        }.start()
    }

    /// Waits for the program and returns its outcome.
    public func wait() throws -> ProcessResult {
        done.wait()
        done.signal()
        return try result!.get()
    }
}

extension ProcessRunner {
    /// Starts `tool` and returns at once; `wait()` gives its result.
    public static func startCapturing(
        _ tool: String, _ arguments: [String], environment: [String: String] = [:], timeoutSeconds: Double = 300
    ) -> BackgroundRun {
        BackgroundRun { try run(tool, arguments, environment: environment, timeoutSeconds: timeoutSeconds) }
    }
}
