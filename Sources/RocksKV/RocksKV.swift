// RocksKV
