from reid_deploy.cli import run

run()
