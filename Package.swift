// swift-tools-version: 6.1
//
// VolumeDriver: a log-structured block-volume driver on object storage.
// Dependency direction (top imports bottom, never the reverse):
//
//   vd -> VDCommands -> VolumeRouter, NBDServer
//   VolumeRouter -> Scrubber (namespace replay, scrub results), SCOCache, BlockMap, TransactionLog, ObjectStore
//   SCOCache -> FlashIO, ObjectStore;  BlockMap -> VolumeCore (any KeyValueStore; RocksKV implements it);  ObjectStore -> FlashIO, SnappyCodec? (no), CLibS3
//   everything -> VolumeCore
//
// Each C library is reached through exactly one Swift target:
//   CRocksDB -> RocksKV, CLibS3 -> ObjectStore (signature V2; V4 goes through AsyncHTTPClient), CSnappy -> SnappyCodec,
//   CLibAIO -> FlashIO.

import PackageDescription

let swiftSettings: [SwiftSetting] = [
    .swiftLanguageMode(.v6),
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("InternalImportsByDefault"),
]

let package = Package(
    name: "VolumeDriver",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "vd", targets: ["vd"])
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
        .package(url: "https://github.com/LebJe/TOMLKit.git", from: "0.6.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
    ],
    targets: [
        // MARK: C libraries (system) and our one C helper
        .systemLibrary(name: "CRocksDB", pkgConfig: "rocksdb", providers: [.apt(["librocksdb-dev"])]),
        .systemLibrary(name: "CLibS3", providers: [.apt(["libs3-dev"])]),
        .systemLibrary(name: "CSnappy", pkgConfig: "snappy", providers: [.apt(["libsnappy-dev"])]),
        .systemLibrary(name: "CLibAIO", providers: [.apt(["libaio-dev"])]),
        .target(name: "CCRC32C"),

        // MARK: value types, codecs, limits (no I/O)
        .target(
            name: "VolumeCore",
            dependencies: [
                "CCRC32C",
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),

        // MARK: wrappers of the C libraries
        .target(
            name: "FlashIO",
            dependencies: ["VolumeCore", "CLibAIO", .product(name: "Logging", package: "swift-log")],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "SnappyCodec",
            dependencies: ["VolumeCore", "CSnappy", .product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: swiftSettings
        ),
        .target(name: "RocksKV", dependencies: ["VolumeCore", "CRocksDB"], swiftSettings: swiftSettings),

        // MARK: storage components
        .target(
            name: "ObjectStore",
            dependencies: [
                "VolumeCore", "FlashIO", "CLibS3",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Collections", package: "swift-collections"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(name: "TransactionLog", dependencies: ["VolumeCore", "FlashIO"], swiftSettings: swiftSettings),
        .target(
            name: "BlockMap",
            dependencies: ["VolumeCore", .product(name: "Collections", package: "swift-collections")],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "SCOCache",
            dependencies: [
                "VolumeCore", "FlashIO", "ObjectStore", "TransactionLog",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "Scrubber",
            dependencies: [
                "VolumeCore", "FlashIO", "ObjectStore", "TransactionLog", "BlockMap", "RocksKV", "SnappyCodec",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "DTL",
            dependencies: [
                "VolumeCore", "FlashIO",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "VolumeRouter",
            dependencies: [
                "VolumeCore", "FlashIO", "ObjectStore", "TransactionLog", "BlockMap", "SCOCache", "SnappyCodec",
                "Scrubber", "DTL",
                "RocksKV",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Collections", package: "swift-collections"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ],
            swiftSettings: swiftSettings
        ),

        // MARK: protocol front end
        .target(
            name: "NBDServer",
            dependencies: [
                "VolumeCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),

        // MARK: management API (HTTP/JSON over a Unix socket)
        .target(
            name: "ManagementAPI",
            dependencies: [
                "VolumeCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),

        // MARK: command line
        .target(
            name: "VDCommands",
            dependencies: [
                "VolumeCore", "VolumeRouter", "NBDServer", "ObjectStore", "FlashIO", "ManagementAPI", "Scrubber",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "TOMLKit", package: "TOMLKit"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(name: "vd", dependencies: ["VDCommands"], swiftSettings: swiftSettings),
        .executableTarget(
            name: "vd-bench-s3",
            dependencies: ["ObjectStore", "VolumeCore", .product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: swiftSettings
        ),

        // MARK: test support
        .target(
            name: "VolumeTesting",
            dependencies: [
                "VolumeCore", "ObjectStore", "FlashIO",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ],
            swiftSettings: swiftSettings
        ),

        .target(
            name: "VolumeSimulation",
            dependencies: [
                "VolumeCore", "FlashIO", "ObjectStore", "VolumeRouter", "Scrubber", "VolumeTesting", "DTL",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "HeapModule", package: "swift-collections"),
            ],
            // The simulated world runs millions of times per test run: optimized even in debug builds.
            swiftSettings: swiftSettings + [.unsafeFlags(["-O"], .when(configuration: .debug))]
        ),
        .executableTarget(
            name: "vd-sim",
            dependencies: ["VolumeSimulation", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            swiftSettings: swiftSettings
        ),

        // MARK: tests
        .testTarget(
            name: "VolumeCoreTests",
            dependencies: ["VolumeCore", "VolumeTesting"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "NBDServerTests",
            dependencies: [
                "NBDServer", "VolumeCore", "VolumeTesting",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "VolumeRouterTests",
            dependencies: [
                "VolumeRouter", "VolumeCore", "VolumeTesting", "ObjectStore", "SCOCache", "FlashIO", "TransactionLog",
                "BlockMap", "RocksKV", "SnappyCodec", "Scrubber", "DTL",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "SimulationTests",
            dependencies: [
                "VolumeSimulation", "VolumeCore", "FlashIO", .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "VDCommandsTests",
            dependencies: [
                "VDCommands", "VolumeCore",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "IntegrationTests",
            dependencies: [
                "vd", "VolumeTesting", "VolumeCore", "ObjectStore", .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ObjectStoreTests",
            dependencies: [
                "ObjectStore", "VolumeCore", "VolumeTesting",
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
    ]
)
