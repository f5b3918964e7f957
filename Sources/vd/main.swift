// vd: the VolumeDriver command line (see VDCommands).
import VDCommands

await VDCommand.runFromCommandLine()
