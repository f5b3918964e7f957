// VolumeRouter
