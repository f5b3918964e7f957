// BlockMap
