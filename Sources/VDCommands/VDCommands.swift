// VDCommands
