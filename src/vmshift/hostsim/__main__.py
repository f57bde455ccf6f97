from vmshift.hostsim.main import run

run()
