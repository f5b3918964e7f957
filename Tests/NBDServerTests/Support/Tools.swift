// Running the real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio). A missing tool fails the test with the
// apt package to install; it is never skipped.

import Dispatch
import Foundation
import Testing

struct ToolFailure: Error, CustomStringConvertible {
    var description: String
}

/// The absolute path of `name` on PATH, or nil.
func findTool(_ name: String) -> String? {
    let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
    for directory in path.split(separator: ":") + ["/usr/bin", "/usr/sbin"] {
        let candidate = "\(directory)/\(name)"
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
    }
    return nil
}

/// Written by the two reader threads, read after `DispatchGroup.wait` (which orders the accesses).
private final class Collected: @unchecked Sendable {
    var out = Data()
    var err = Data()
}

struct ToolOutput: Sendable {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs a tool and returns its output; throws if it is missing or (with `check`) exits non-zero or times out.
func runToolOutput(
    _ name: String, _ arguments: [String], package: String, timeout: Duration = .seconds(60),
    currentDirectory: String? = nil, check: Bool = true
) async throws -> ToolOutput {
    guard let executable = findTool(name) else {
        throw ToolFailure(description: "'\(name)' is not installed: run `apt-get install -y \(package)`")
    }
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    if let currentDirectory { process.currentDirectoryURL = URL(fileURLWithPath: currentDirectory) }
    let stdout = Pipe()
    let stderr = Pipe()
    process.standardOutput = stdout
    process.standardError = stderr
    process.standardInput = FileHandle.nullDevice

    let output: ToolOutput = try await withCheckedThrowingContinuation { continuation in
        DispatchQueue.global().async {
            do {
                try process.run()
            } catch {
                continuation.resume(throwing: ToolFailure(description: "cannot start \(name): \(error)"))
                return
            }
            let group = DispatchGroup()
            let collected = Collected()
            group.enter()
            DispatchQueue.global().async {
                collected.out = stdout.fileHandleForReading.readDataToEndOfFile()
                group.leave()
            }
            group.enter()
            DispatchQueue.global().async {
                collected.err = stderr.fileHandleForReading.readDataToEndOfFile()
                group.leave()
            }
            let seconds = Double(timeout.components.seconds)
            let watchdog = DispatchWorkItem { if process.isRunning { process.terminate() } }
            DispatchQueue.global().asyncAfter(deadline: .now() + seconds, execute: watchdog)
            process.waitUntilExit()
            watchdog.cancel()
            group.wait()
            continuation.resume(
                returning: ToolOutput(
                    status: process.terminationStatus, stdout: String(decoding: collected.out, as: UTF8.self),
                    stderr: String(decoding: collected.err, as: UTF8.self)))
        }
    }
    if check && output.status != 0 {
        throw ToolFailure(
            description: """
                \(name) \(arguments.joined(separator: " ")) exited with \(output.status)
                stdout: \(output.stdout.suffix(2000))
                stderr: \(output.stderr.suffix(2000))
                """)
    }
    return output
}

/// Runs a tool that must succeed and returns its standard output.
@discardableResult
func runTool(
    _ name: String, _ arguments: [String], package: String, timeout: Duration = .seconds(60),
    currentDirectory: String? = nil
) async throws -> String {
    try await runToolOutput(
        name, arguments, package: package, timeout: timeout, currentDirectory: currentDirectory
    ).stdout
}
