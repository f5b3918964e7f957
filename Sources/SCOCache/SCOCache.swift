// SCOCache
