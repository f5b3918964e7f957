// NBDServer
