// SnappyCodec
